"""What the compiled training step traces for GPU tensors, backward included, without a GPU.

``tests/test_networks.py`` traces the compiled forward passes on fake CUDA tensors. The backward
cannot be traced that way on a machine without a GPU: before it differentiates anything on a
CUDA tensor, fake or not, torch's autograd engine asks the CUDA driver about the device's
context (torch 2.14.1: "hasPrimaryContext expects a valid device index", from
``GraphTask::stash_current_streams``; pytorch/pytorch#92627), and AOTAutograd builds the
backward graph with that engine. So the backward is traced on a stand-in: fake CPU tensors
whose dispatch asks the CUDA question (``backends.unavailable_reason`` answers for a CUDA
device), which picks the same implementation for every op, and the same fp16 layers and fake
outputs follow; a test checks that the stand-in traces, op for op and dtype for dtype, the
forward graphs that fake CUDA tensors trace.

The compile backend records what AOTAutograd hands inductor, with inductor's decompositions
and partitioner: Dynamo's graph, then the forward and backward (or inference) graphs, which it
runs on the fake tensors. No kernel runs. TF32 is off for convolutions, as in training (the
CUDA backend then takes the composite path for its fp32 layers).
"""
import contextlib
import re

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import batikfast
from batikfast import backends
from batikfast.loss import StyleGAN2Loss, _input_gradient
from batikfast.networks import Discriminator, Generator
from tests.test_networks import full_fp32_on_gpu

IMPLS = ["ref", "triton", "cuda"]
FP16 = torch.float16
# The fast backends' backward: bias_act's is its own op, upfirdn2d's and modulated_conv2d's are
# the forward op again (the adjoint resampling, the transposed convolution).
SYNTHESIS_BACKWARD_OPS = {"batikfast.bias_act_grad.default", "batikfast.modulated_conv2d.default",
                          "batikfast.upfirdn2d.default"}
D_BACKWARD_OPS = {"batikfast.bias_act_grad.default", "batikfast.upfirdn2d.default"}
MAPPING_BACKWARD_OPS = {"batikfast.bias_act_grad.default"}


def small_networks(mixed_precision_dtype=FP16):
    """G and D with one fp32 resolution (4) and one mixed-precision resolution (8)."""
    torch.manual_seed(6)
    mixed = dict(num_fp16_res=1, mixed_precision_dtype=mixed_precision_dtype)
    G = Generator(4, 0, 4, 8, 3, channel_base=32, channel_max=4, conv_clamp=256, **mixed,
                  mapping_kwargs=dict(num_layers=1))
    D = Discriminator(0, 8, 3, channel_base=32, channel_max=4, conv_clamp=256, **mixed,
                      mapping_kwargs=dict(num_layers=1), epilogue_kwargs=dict(mbstd_group_size=2))
    return G.requires_grad_(False), D.requires_grad_(False)


class GraphRecorder:
    """A torch.compile backend: Dynamo's graph through AOTAutograd as inductor would get it;
    records every graph and runs it on the fake tensors (creating a real CUDA tensor, or
    running a kernel, is what it must never do)."""

    def __init__(self, fake: FakeTensorMode, aot: bool = True):
        self.fake = fake
        self.graphs = {"dynamo": [], "forward": [], "backward": [], "inference": []}
        self._aot = aot_autograd(
            fw_compiler=self._recorder("forward"), bw_compiler=self._recorder("backward"),
            inference_compiler=self._recorder("inference"),
            partition_fn=min_cut_rematerialization_partition,
            decompositions=select_decomp_table()) if aot else None

    def __call__(self, graph_module, example_inputs):
        self.graphs["dynamo"].append(graph_module)
        if self._aot is None:
            return self._runner(graph_module)
        return self._aot(graph_module, example_inputs)

    def _runner(self, graph_module):
        def run(*inputs):
            with self.fake:
                return graph_module(*inputs)
        return run

    def _recorder(self, kind):
        def compiler(graph_module, example_inputs):
            self.graphs[kind].append(graph_module)
            return make_boxed_func(self._runner(graph_module))
        return compiler

    def counts(self) -> dict:
        return {kind: len(graphs) for kind, graphs in self.graphs.items()}

    def ops(self, kind: str, index: int = -1) -> set[str]:
        """The batikfast ops in the ``index``-th graph of ``kind``."""
        return {name for name, _ in self.ops_and_dtypes(kind, index)}

    def ops_and_dtypes(self, kind: str, index: int = -1) -> set[tuple[str, torch.dtype]]:
        return {(str(node.target), node.meta["val"].dtype)
                for node in self.graphs[kind][index].graph.nodes
                if str(node.target).startswith("batikfast.")}

    def dtypes(self, kind: str, index: int = -1) -> set[torch.dtype]:
        return {node.meta["val"].dtype for node in self.graphs[kind][index].graph.nodes
                if isinstance(node.meta.get("val"), torch.Tensor)}


@pytest.fixture
def gpu_dispatch(impl, monkeypatch):
    """Backend ``impl`` for every op, chosen as for CUDA tensors also for (fake) CPU tensors,
    with TF32 off as in training."""
    reason = backends.unavailable_reason(impl, torch.device("cuda"), FP16)
    if reason is not None:
        pytest.skip(f"{impl} cannot run on a GPU here: {reason}")
    ask_for_cuda = backends.unavailable_reason

    def as_for_cuda_tensors(impl, device, dtype):
        return ask_for_cuda(impl, torch.device("cuda") if device.type == "cpu" else device, dtype)

    monkeypatch.setattr(backends, "unavailable_reason", as_for_cuda_tensors)
    torch._dynamo.reset()
    batikfast.set_backend(impl)
    try:
        with full_fp32_on_gpu():
            yield
    finally:
        batikfast.set_backend(None)
        torch._dynamo.reset()


def fake_state(module, fake, device, requires_grad=True):
    """``module``'s parameters (leaves) and buffers as fake tensors on ``device``."""
    with fake:
        params = {name: p.detach().to(device).requires_grad_(requires_grad)
                  for name, p in module.named_parameters()}
        buffers = {name: b.to(device) for name, b in module.named_buffers()}
    return params, buffers


def compile_functional(module, recorder, kwargs=None):
    def call(params, buffers, *args):
        return torch.func.functional_call(module, (params, buffers), args, kwargs or {})
    return torch.compile(call, backend=recorder, fullgraph=True, dynamic=False)


def assert_gradients_like(tensors: dict, grads: dict):
    """Every tensor got a gradient from the compiled backward: its shape, dtype and device."""
    assert sorted(grads) == sorted(tensors)
    for name, tensor in tensors.items():
        grad = grads[name]
        assert isinstance(grad, FakeTensor), f"{name}: no gradient from the compiled backward"
        assert (grad.shape, grad.dtype, grad.device) == (tensor.shape, tensor.dtype,
                                                         tensor.device), name


def test_without_a_gpu_torch_cannot_differentiate_fake_cuda_tensors_hence_the_cpu_stand_in():
    """When this fails, torch differentiates fake CUDA tensors without a GPU: trace the tests
    below on fake CUDA tensors instead of the stand-in (and drop this test)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the limit documented is that of machines without one")
    with FakeTensorMode():
        x = torch.randn(3, device="cuda", requires_grad=True)
        loss = (x * 2).sum()
    with pytest.raises(RuntimeError, match="hasPrimaryContext expects a valid device index"):
        torch.autograd.grad(loss, x)


def forward_graph(module, args, kwargs, device):
    """(op, dtype) of every call in Dynamo's graph of ``module(*args)`` on fake ``device``
    tensors, in order."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = GraphRecorder(fake, aot=False)
    params, buffers = fake_state(module, fake, device, requires_grad=False)
    with fake:
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    torch._dynamo.reset()
    out = compile_functional(module, recorder, kwargs)(params, buffers, *args)
    assert out.device.type == device and recorder.counts()["dynamo"] == 1
    return [(str(node.target), node.meta["example_value"].dtype)
            for node in recorder.graphs["dynamo"][0].graph.nodes
            if node.op in ("call_function", "call_method", "call_module")
            and isinstance(node.meta.get("example_value"), torch.Tensor)]


@pytest.mark.parametrize("impl", IMPLS)
def test_the_cpu_stand_in_traces_the_graphs_that_fake_cuda_tensors_trace(impl, gpu_dispatch):
    G, D = small_networks()
    ws = torch.randn(2, G.synthesis.num_ws, 4)
    for module, args, kwargs in ((G.synthesis, (ws,), dict(noise_mode="const")),
                                 (D, (torch.randn(2, 3, 8, 8), None, torch.tensor([3, 5])), {})):
        on_cuda = forward_graph(module, args, kwargs, "cuda")
        on_stand_in = forward_graph(module, args, kwargs, "cpu")
        assert on_stand_in == on_cuda
        assert (FP16 in {dtype for _, dtype in on_cuda}) and len(on_cuda) > 20
        fast_ops = {op for op, _ in on_cuda if op.startswith("batikfast.")}
        assert bool(fast_ops) == (impl != "ref")


@pytest.mark.parametrize("low", [FP16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_synthesis_and_discriminator_differentiate_in_one_graph_with_the_fast_backward_ops(
        impl, low, gpu_dispatch):
    """One Dynamo graph, one forward and one backward graph each; the fast backends' backward
    graphs hold their backward ops, in fp16 or bf16 for the mixed-precision layers; every
    parameter and the input get a gradient of their shape, dtype and device."""
    G, D = small_networks(low)
    cases = {"synthesis": (G.synthesis, torch.randn(2, G.synthesis.num_ws, 4), (),
                           dict(noise_mode="const"), SYNTHESIS_BACKWARD_OPS),
             "D": (D, torch.randn(2, 3, 8, 8), (None, torch.tensor([3, 5])), {}, D_BACKWARD_OPS)}
    for what, (module, x, rest, kwargs, backward_ops) in cases.items():
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        recorder = GraphRecorder(fake)
        params, buffers = fake_state(module, fake, "cpu")
        with fake:
            x = x.clone().requires_grad_(True)
        torch._dynamo.reset()
        out = compile_functional(module, recorder, kwargs)(params, buffers, x, *rest)
        # Outside the fake mode: AOTAutograd copies the backward graph before compiling it,
        # which fails for its constants under a fake mode (the compiled graph enters it itself).
        grads = torch.autograd.grad(out.float().square().sum(), [*params.values(), x],
                                    allow_unused=True)
        assert recorder.counts() == {"dynamo": 1, "forward": 1, "backward": 1, "inference": 0}, what
        assert_gradients_like({**params, "input": x}, dict(zip([*params, "input"], grads)))
        assert low in recorder.dtypes("backward"), f"{what}: the {low} layers' backward"
        if impl == "ref":
            assert recorder.ops("forward") == recorder.ops("backward") == set(), what
        else:
            assert backward_ops <= recorder.ops("backward"), what
            low_ops = {op for op, dtype in recorder.ops_and_dtypes("backward") if dtype == low}
            assert "batikfast.bias_act_grad.default" in low_ops, what
            assert "batikfast.upfirdn2d.default" in low_ops, what


def run_phase(loss, phase, module, others, inputs):
    """As the training loop runs a phase: only ``module`` requires grad."""
    for other in others:
        other.zero_grad(set_to_none=True)
    module.zero_grad(set_to_none=True)
    module.requires_grad_(True)
    try:
        return loss.accumulate_gradients(phase, *inputs, gain=2.0)
    finally:
        module.requires_grad_(False)


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_main_phases_trace_each_network_forward_and_backward_in_one_graph(
        impl, gpu_dispatch):
    """Gmain and Dmain as the loop runs them: G.mapping, G.synthesis and D each compiled (here
    with fullgraph=True, so a graph break raises), driven by StyleGAN2Loss. Augmentation,
    diffusion noise and style mixing run eagerly outside the compiled modules and draw their
    random numbers on the host, which fake tensors cannot give: left out (t = 0)."""
    G, D = small_networks()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    recorders = {name: GraphRecorder(fake) for name in ("mapping", "synthesis", "D")}
    compiled = [torch.compile(module, backend=recorders[name], fullgraph=True, dynamic=False)
                for name, module in (("mapping", G.mapping), ("synthesis", G.synthesis), ("D", D))]
    loss = StyleGAN2Loss(*compiled, style_mixing_prob=0.0)
    with fake:
        inputs = (torch.randn(2, 3, 8, 8), None, torch.randn(2, 4), None)

    stats = run_phase(loss, "Gmain", G, [D], inputs)
    assert isinstance(stats["G/loss"], FakeTensor)
    for name in ("mapping", "synthesis", "D"):
        assert recorders[name].counts() == {"dynamo": 1, "forward": 1, "backward": 1,
                                            "inference": 0}, name
    assert_gradients_like(dict(G.named_parameters()),
                          {name: p.grad for name, p in G.named_parameters()})
    assert all(p.grad is None for p in D.parameters())
    assert FP16 in recorders["synthesis"].dtypes("backward")
    assert FP16 in recorders["D"].dtypes("backward")
    if impl == "ref":
        assert all(not r.ops(kind) for r in recorders.values() for kind in ("forward", "backward"))
    else:
        assert MAPPING_BACKWARD_OPS <= recorders["mapping"].ops("backward")
        assert SYNTHESIS_BACKWARD_OPS <= recorders["synthesis"].ops("backward")
        assert D_BACKWARD_OPS <= recorders["D"].ops("backward")

    run_phase(loss, "Dmain", D, [G], inputs)
    # G under no_grad: a new graph, forward only. D with its parameters requiring grad: a new
    # graph, reused for the reals.
    for name in ("mapping", "synthesis"):
        assert recorders[name].counts() == {"dynamo": 2, "forward": 1, "backward": 1,
                                            "inference": 1}, name
    assert recorders["D"].counts() == {"dynamo": 2, "forward": 2, "backward": 2, "inference": 0}
    assert_gradients_like(dict(D.named_parameters()),
                          {name: p.grad for name, p in D.named_parameters()})
    assert all(p.grad is None for p in G.parameters())
    if impl != "ref":
        assert D_BACKWARD_OPS <= recorders["D"].ops("backward")


class TorchFuncRefusesTheFastOps(Exception):
    """torch 2.14.1's known refusal (see batikfast/loss.py), told apart from any other error."""


@contextlib.contextmanager
def telling_apart_the_torch_func_refusal():
    try:
        yield
    # torch 2.14 raises the refusal as Unsupported, torch 2.11 (the GPU machine's) as the error
    # of running the op on fake tensors.
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.TorchRuntimeError) as error:
        if "must override the setup_context staticmethod" not in str(error):
            raise
        op = re.search(r"call_function (batikfast\.\w+)\.default", str(error))
        where = op.group(1) if op else "no batikfast op"
        raise TorchFuncRefusesTheFastOps(f"at {where}") from error


# Where, on fake CUDA tensors and on the stand-in alike: D at batikfast.bias_act after its fp16
# layer's convolution; G at its first batikfast.modulated_conv2d with triton, at bias_act with
# cuda (its fp32 layers convolve in cuDNN: TF32 is off).
REFUSED = pytest.mark.xfail(
    strict=True, raises=TorchFuncRefusesTheFastOps,
    reason="torch 2.14.1 and 2.11: Dynamo refuses the fast ops under torch.func.grad ('In order "
           "to use an autograd.Function with functorch transforms ..., it must override the "
           "setup_context staticmethod'); R1 and path length run eagerly")
FAST_REFUSED = [pytest.param("triton", marks=REFUSED), pytest.param("cuda", marks=REFUSED)]


@pytest.mark.parametrize("phase", ["Dreg", "Greg"])
@pytest.mark.parametrize("impl", ["ref", *FAST_REFUSED])
def test_compiled_r1_and_path_length_gradients_trace_through_torch_func(impl, phase, gpu_dispatch):
    """R1 (Dreg) and path length (Greg) as ``compile_regularizers`` compiles them: the inner
    gradient by torch.func.grad inside one fullgraph compiled function, whose outputs are
    differentiated to every parameter of the network (fp16 layers included)."""
    G, D = small_networks()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = GraphRecorder(fake)
    loss = StyleGAN2Loss(G.mapping, G.synthesis, D, style_mixing_prob=0.0,
                         compile_regularizers=dict(backend=recorder, dynamic=False))
    module = D if phase == "Dreg" else G
    with fake:
        inputs = (torch.randn(2, 3, 8, 8), None, torch.randn(2, 4), None)
    with telling_apart_the_torch_func_refusal():
        stats = run_phase(loss, phase, module, [G, D], inputs)
    assert isinstance(stats["r1_penalty" if phase == "Dreg" else "pl_penalty"], FakeTensor)
    assert recorder.counts() == {"dynamo": 1, "forward": 1, "backward": 1, "inference": 0}
    compiled = D if phase == "Dreg" else G.synthesis
    assert_gradients_like(dict(compiled.named_parameters()),
                          {name: p.grad for name, p in compiled.named_parameters()})
    assert FP16 in recorder.dtypes("forward") and FP16 in recorder.dtypes("backward")


@pytest.mark.parametrize("phase", ["Dreg", "Greg"])
@pytest.mark.parametrize("impl", FAST_REFUSED)
def test_on_fake_cuda_tensors_the_regularizers_inner_gradient_traces_with_the_fast_ops(
        impl, phase, gpu_dispatch):
    """Dynamo's graph of the compiled inner gradient (torch.func.grad of D's logits for R1, of
    <G.synthesis(ws), noise> for path length) on fake CUDA tensors: where the refusal happens
    for GPU tensors. (Dynamo only: its AOTAutograd graphs need the engine; once Dynamo gets
    through without a GPU the engine's error fails this test.)"""
    G, D = small_networks()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = GraphRecorder(fake, aot=False)
    module = D if phase == "Dreg" else G.synthesis
    params, buffers = fake_state(module, fake, "cuda")
    with fake:
        if phase == "Dreg":
            args = (torch.randn(2, 3, 8, 8, device="cuda"),
                    (None, torch.zeros(2, dtype=torch.long, device="cuda")), None)
        else:
            args = (torch.randn(2, G.synthesis.num_ws, 4, device="cuda"), (),
                    torch.randn(2, 3, 8, 8, device="cuda"))
    inner_gradient = torch.compile(_input_gradient(module), backend=recorder, fullgraph=True,
                                   dynamic=False)
    with telling_apart_the_torch_func_refusal():
        input_grad, _ = inner_gradient(params, buffers, *args)
    assert recorder.counts()["dynamo"] == 1
    assert input_grad.device.type == "cuda" and input_grad.shape == args[0].shape
