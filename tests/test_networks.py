"""The StyleGAN2 generator and the t-conditioned discriminator."""
import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch

import batikfast
from batikfast import backends
from batikfast.networks import Discriminator, Generator, MappingNetwork

TINY = dict(channel_base=256, channel_max=32, conv_clamp=256)


def tiny_generator(**kwargs):
    options = dict(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3,
                   mapping_kwargs=dict(num_layers=2), **TINY)
    options.update(kwargs)
    return Generator(**options)


def tiny_discriminator(**kwargs):
    options = dict(c_dim=0, img_resolution=16, img_channels=3,
                   mapping_kwargs=dict(num_layers=2), epilogue_kwargs=dict(mbstd_group_size=2),
                   **TINY)
    options.update(kwargs)
    return Discriminator(**options)


def count(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Parameter counts of the paper256 configuration, from the architecture written out by hand.

def _fc(fan_in, fan_out, bias=True):
    return fan_in * fan_out + (fan_out if bias else 0)


def _conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def expected_generator_params(z_dim, w_dim, resolution, img_channels, channel_base, channel_max,
                              mapping_layers):
    channels = lambda res: min(channel_base // res, channel_max)  # noqa: E731
    total = _fc(z_dim, w_dim) + (mapping_layers - 1) * _fc(w_dim, w_dim)
    synthesis_layer = lambda cin, cout: _fc(w_dim, cin) + _conv(cin, cout, 3) + 1  # noqa: E731
    to_rgb = lambda cin: _fc(w_dim, cin) + _conv(cin, img_channels, 1)  # noqa: E731
    res = 4
    total += channels(4) * 4 * 4 + synthesis_layer(channels(4), channels(4)) + to_rgb(channels(4))
    while res < resolution:
        res *= 2
        total += synthesis_layer(channels(res // 2), channels(res))
        total += synthesis_layer(channels(res), channels(res)) + to_rgb(channels(res))
    return total


def expected_discriminator_params(resolution, img_channels, channel_base, channel_max, t_dim,
                                  mapping_layers=8):
    channels = lambda res: min(channel_base // res, channel_max)  # noqa: E731
    total = _conv(img_channels, channels(resolution), 1)  # FromRGB
    res = resolution
    while res > 4:
        tmp, out = channels(res), channels(res // 2)
        total += _conv(tmp, tmp, 3) + _conv(tmp, out, 3) + _conv(tmp, out, 1, bias=False)
        res //= 2
    c4 = channels(4)
    cmap_dim = c4 if t_dim > 0 else 0
    total += _conv(c4 + 1, c4, 3) + _fc(c4 * 16, c4) + _fc(c4, cmap_dim or 1)
    if t_dim > 0:
        total += _fc(t_dim, cmap_dim) + mapping_layers * _fc(cmap_dim, cmap_dim)
    return total


PAPER256 = dict(channel_base=16384, channel_max=512, num_fp16_res=4, conv_clamp=256)


def test_paper256_generator_has_the_stylegan2_ada_parameter_count():
    expected = expected_generator_params(512, 512, 256, 3, 16384, 512, 8)
    assert expected == 24_767_458  # the figure NVIDIA's training log prints for paper256
    G = Generator(512, 0, 512, 256, 3, mapping_kwargs=dict(num_layers=8), **PAPER256)
    assert count(G) == expected
    assert G.num_ws == 14


def test_paper256_unconditional_discriminator_has_the_stylegan2_ada_parameter_count():
    expected = expected_discriminator_params(256, 3, 16384, 512, t_dim=0)
    assert expected == 24_001_089
    D = Discriminator(0, 256, 3, t_dim=0, epilogue_kwargs=dict(mbstd_group_size=8), **PAPER256)
    assert count(D) == expected


def test_paper256_t_conditioned_discriminator_adds_the_t_mapping_and_projection():
    expected = expected_discriminator_params(256, 3, 16384, 512, t_dim=1)
    D = Discriminator(0, 256, 3, t_dim=1, epilogue_kwargs=dict(mbstd_group_size=8), **PAPER256)
    assert count(D) == expected == 24_001_089 + 2_364_415


def test_parameter_and_buffer_names_are_nvidias():
    G = tiny_generator()
    names = set(G.state_dict())
    for name in ["mapping.fc0.weight", "mapping.fc1.bias", "mapping.w_avg", "synthesis.b4.const",
                 "synthesis.b4.conv1.affine.weight", "synthesis.b4.conv1.affine.bias",
                 "synthesis.b4.conv1.noise_strength", "synthesis.b4.conv1.noise_const",
                 "synthesis.b8.conv0.weight", "synthesis.b8.conv0.resample_filter",
                 "synthesis.b16.torgb.weight", "synthesis.b16.torgb.bias",
                 "synthesis.b16.resample_filter"]:
        assert name in names, name
    D = tiny_discriminator()
    names = set(D.state_dict())
    for name in ["b16.fromrgb.weight", "b16.conv0.bias", "b16.conv1.weight", "b16.skip.weight",
                 "b8.conv1.resample_filter", "b4.conv.weight", "b4.fc.weight", "b4.out.bias",
                 "mapping.embed.weight", "mapping.fc1.weight"]:
        assert name in names, name
    assert "b8.fromrgb.weight" not in names


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mixed", [None, torch.bfloat16, torch.float16])
def test_generator_and_discriminator_shapes_and_dtypes(mixed):
    kwargs = {} if mixed is None else dict(num_fp16_res=2, mixed_precision_dtype=mixed)
    G = tiny_generator(**kwargs)
    D = tiny_discriminator(**kwargs)
    torch.manual_seed(0)
    img = G(torch.randn(4, 16), None)
    assert img.shape == (4, 3, 16, 16) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    logits = D(img, None, torch.tensor([0, 3, 7, 10]))
    assert logits.shape == (4, 1) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    if mixed is not None:
        assert G.synthesis.b16.use_fp16 and G.synthesis.b8.use_fp16
        assert not G.synthesis.b4.use_fp16
        assert D.b16.use_fp16 and D.b8.use_fp16


def test_mixed_precision_output_stays_close_to_fp32():
    torch.manual_seed(1)
    G = tiny_generator().eval()
    G_mixed = tiny_generator(num_fp16_res=2, mixed_precision_dtype=torch.bfloat16).eval()
    G_mixed.load_state_dict(G.state_dict())
    z = torch.randn(2, 16)
    full = G(z, None, noise_mode="const")
    mixed = G_mixed(z, None, noise_mode="const")
    scale = full.abs().max()
    assert (full - mixed).abs().max() <= 0.05 * scale


def test_conditional_generator_and_discriminator_take_labels():
    G = tiny_generator(c_dim=5)
    D = tiny_discriminator(c_dim=5)
    c = torch.nn.functional.one_hot(torch.arange(2), 5).float()
    img = G(torch.randn(2, 16), c)
    assert D(img, c, torch.tensor([1, 2])).shape == (2, 1)
    assert D.mapping.embed.weight.shape == (D.cmap_dim, 6)  # 5 labels + t


def test_discriminator_output_depends_on_t():
    torch.manual_seed(2)
    D = tiny_discriminator()
    img = torch.randn(2, 3, 16, 16)
    a = D(img, None, torch.tensor([0, 0]))
    b = D(img, None, torch.tensor([500, 500]))
    assert not torch.allclose(a, b)
    assert torch.equal(a, D(img, None, torch.tensor([[0.0], [0.0]])))


def test_discriminator_accepts_non_contiguous_images():
    torch.manual_seed(6)
    D = tiny_discriminator()
    img = torch.randn(2, 3, 16, 16)
    t = torch.tensor([2, 9])
    expected = D(img, None, t)
    torch.testing.assert_close(D(img.to(memory_format=torch.channels_last), None, t), expected)
    wide = torch.randn(2, 3, 16, 32)
    wide[..., ::2] = img
    torch.testing.assert_close(D(wide[..., ::2], None, t), expected)


def test_plain_discriminator_has_no_mapping_without_labels():
    D = tiny_discriminator(t_dim=0)
    assert not hasattr(D, "mapping") and D.cmap_dim == 0
    assert D(torch.randn(2, 3, 16, 16), None).shape == (2, 1)


def test_discriminator_takes_nvidias_arguments_in_nvidias_order():
    # NVIDIA: (c_dim, img_resolution, img_channels, architecture, channel_base, channel_max,
    # num_fp16_res, conv_clamp, cmap_dim, block_kwargs, mapping_kwargs, epilogue_kwargs);
    # a pickled record's init_args are passed in that order too. t_dim is batikfast's.
    D = Discriminator(0, 16, 3, "skip", 256, 32, 0, 256, None, {}, dict(num_layers=2),
                      dict(mbstd_group_size=2))
    assert D.b16.architecture == "skip" and D.t_dim == 1
    assert D.b16.conv0.weight.shape[0] == 256 // 16
    assert D(torch.randn(2, 3, 16, 16), None, torch.tensor([0.0, 3.0])).shape == (2, 1)


def test_seeded_generator_is_deterministic():
    G = tiny_generator()
    z = torch.randn(3, 16)
    torch.manual_seed(123)
    a = G(z, None)
    torch.manual_seed(123)
    b = G(z, None)
    assert torch.equal(a, b)
    assert torch.equal(G(z, None, noise_mode="const"), G(z, None, noise_mode="const"))
    G.synthesis.b16.conv1.noise_strength.data.fill_(1.0)
    torch.manual_seed(5)
    c = G(z, None)
    assert not torch.equal(c, G(z, None)), "random noise must change the image"


def test_truncation_to_zero_gives_the_average_image():
    G = tiny_generator()
    G.mapping.w_avg.normal_()
    images = G(torch.randn(3, 16), None, truncation_psi=0.0, noise_mode="none")
    assert torch.allclose(images[0], images[1], atol=1e-6)
    assert torch.allclose(images[0], images[2], atol=1e-6)


def test_mapping_tracks_w_avg_in_training_only():
    mapping = MappingNetwork(z_dim=8, c_dim=0, w_dim=8, num_ws=3, num_layers=2)
    z = torch.randn(16, 8)
    mapping.eval()
    mapping(z, None)
    assert torch.equal(mapping.w_avg, torch.zeros(8))
    mapping.train()
    w = mapping(z, None)
    assert torch.allclose(mapping.w_avg, w[:, 0].mean(0) * (1 - 0.995), atol=1e-6)
    assert w.shape == (16, 3, 8)


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(3)
    G = tiny_generator()
    D = tiny_discriminator()
    for layer in G.synthesis.modules():
        if hasattr(layer, "noise_strength"):
            layer.noise_strength.data.fill_(0.1)  # a zero strength has a zero noise gradient
    img = G(torch.randn(2, 16), None)
    D(img, None, torch.tensor([1, 4])).sum().backward()
    for name, param in list(G.named_parameters()) + list(D.named_parameters()):
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bad_inputs_raise_errors_naming_the_argument():
    G = tiny_generator()
    D = tiny_discriminator()
    with pytest.raises(ValueError, match="z"):
        G(torch.randn(2, 15), None)
    with pytest.raises(ValueError, match="t"):
        D(torch.randn(2, 3, 16, 16), None)
    with pytest.raises(ValueError, match="img"):
        D(torch.randn(2, 3, 8, 8), None, torch.zeros(2))
    with pytest.raises(ValueError, match="img_resolution"):
        tiny_generator(img_resolution=24)
    with pytest.raises(ValueError, match="mixed_precision_dtype"):
        tiny_generator(num_fp16_res=1, mixed_precision_dtype=torch.float64)
    with pytest.raises(ValueError, match="noise_mode"):
        G(torch.randn(2, 16), None, noise_mode="loud")


def fast_backend_unavailable(impl, device):
    """Why the ``impl`` kernels cannot run the model on ``device``; None when they can."""
    if impl == "triton":
        kernels_dir = Path(backends.__file__).resolve().parent.parent / "kernels"
        for op in ("bias_act", "upfirdn2d", "modulated_conv2d"):
            if not ((kernels_dir / f"{op}.py").exists()
                    or importlib.util.find_spec("batikfast.kernels") is not None
                    and importlib.util.find_spec(f"batikfast.kernels.{op}") is not None):
                return f"the Triton kernel batikfast.kernels.{op} is not there (not yet written?)"
    return backends.unavailable_reason(impl, device, torch.float32)


@contextlib.contextmanager
def full_fp32_on_gpu():
    """The reference must not run its convolutions and matmuls in TF32 when it is the truth."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("mixed", [None, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_generator_and_discriminator_match_between_reference_and_fast_backends(impl, mixed,
                                                                                 device):
    reason = fast_backend_unavailable(impl, device)
    if reason:
        pytest.skip(reason)
    if mixed is not None and device.type != "cuda":
        pytest.skip("the fp16 comparison runs on a GPU only (interpreted Triton is too slow)")
    torch.manual_seed(4)
    # Interpreted Triton is slow: the smallest networks that still up- and down-sample.
    precision = {} if mixed is None else dict(num_fp16_res=1, mixed_precision_dtype=mixed)
    G = Generator(4, 0, 4, 8, 3, channel_base=32, channel_max=4, conv_clamp=256,
                  mapping_kwargs=dict(num_layers=1), **precision).eval().to(device)
    D = Discriminator(0, 8, 3, channel_base=32, channel_max=4, conv_clamp=256,
                      mapping_kwargs=dict(num_layers=1), epilogue_kwargs=dict(mbstd_group_size=2),
                      **precision).to(device)
    for layer in G.synthesis.modules():
        if hasattr(layer, "noise_strength"):
            layer.noise_strength.data.fill_(0.3)
    z = torch.randn(2, 4, device=device)
    t = torch.tensor([3, 5], device=device)
    results = {}
    try:
        with full_fp32_on_gpu():
            for backend in ("ref", impl):
                batikfast.set_backend(backend)
                G.zero_grad(), D.zero_grad()
                img = G(z, None, noise_mode="const")
                logits = D(img, None, t)
                logits.sum().backward()
                results[backend] = (img.detach(), logits.detach(),
                                    G.synthesis.b8.conv0.weight.grad.clone(),
                                    D.b8.conv0.weight.grad.clone())
    finally:
        batikfast.set_backend(None)
    # fp32: TF32 is off on both sides (full_fp32_on_gpu), so only the summation order differs;
    # fp16: both sides round to fp16 in their own order.
    tolerance = 1e-4 if mixed is None else 3e-2
    for ref, fast in zip(results["ref"], results[impl]):
        scale = ref.abs().max().item()
        torch.testing.assert_close(fast, ref, rtol=tolerance, atol=tolerance * max(scale, 1.0))


@pytest.mark.parametrize("impl", ["ref", "triton", "cuda"])
def test_generator_and_discriminator_compile_without_a_graph_break(impl, device):
    """fullgraph=True turns any graph break into an error: dispatch, the ops' wrappers and the
    networks' own code must all trace, forward and backward, on every backend."""
    reason = fast_backend_unavailable(impl, device) if impl != "ref" else None
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    torch.manual_seed(5)
    G = Generator(4, 0, 4, 8, 3, channel_base=32, channel_max=4, conv_clamp=256,
                  mapping_kwargs=dict(num_layers=1)).to(device)
    D = Discriminator(0, 8, 3, channel_base=32, channel_max=4, conv_clamp=256,
                      mapping_kwargs=dict(num_layers=1), epilogue_kwargs=dict(mbstd_group_size=2),
                      ).to(device)
    z = torch.randn(2, 4, device=device)
    t = torch.tensor([3, 5], device=device)
    # aot_eager traces what inductor would get; inductor itself on a GPU.
    compiler = "inductor" if device.type == "cuda" else "aot_eager"
    batikfast.set_backend(impl)
    try:
        with full_fp32_on_gpu():
            ws = torch.compile(G.mapping, fullgraph=True, backend=compiler)(z, None)
            img = torch.compile(G.synthesis, fullgraph=True, backend=compiler)(
                ws, noise_mode="const")
            logits = torch.compile(D, fullgraph=True, backend=compiler)(img, None, t)
            logits.sum().backward()
            eager = D(G.synthesis(G.mapping(z, None), noise_mode="const"), None, t)
    finally:
        batikfast.set_backend(None)
    assert G.synthesis.b8.conv0.weight.grad is not None and D.b8.conv0.weight.grad is not None
    torch.testing.assert_close(logits.detach(), eager.detach(), rtol=1e-4, atol=1e-4)


def _trace_on_fake_gpu(module, args, kwargs=None):
    """Capture ``module(*args)`` as torch.compile(fullgraph=True) sees it for CUDA tensors, on
    fake CUDA tensors (no GPU needed): the graph's batikfast ops, or an error at a graph break."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gpu = torch.device("cuda")
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        state = ({k: v.to(gpu) for k, v in module.named_parameters()},
                 {k: v.to(gpu) for k, v in module.named_buffers()})
        args = [a.to(gpu) if isinstance(a, torch.Tensor) else a for a in args]
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)

        def run(*inputs):  # on the fake tensors: creating a real CUDA tensor needs a GPU
            with fake:
                return graph_module.forward(*inputs)
        return run

    def call(state, *args):
        return torch.func.functional_call(module, state, args, kwargs or {})

    torch._dynamo.reset()
    out = torch.compile(call, backend=capture, fullgraph=True, dynamic=False)(state, *args)
    assert out.device.type == "cuda"
    return {str(node.target) for graph in graphs for node in graph.graph.nodes
            if str(node.target).startswith("batikfast.")}


@pytest.mark.parametrize("impl", ["ref", "triton", "cuda"])
def test_compiled_networks_dispatch_gpu_tensors_without_a_graph_break(impl):
    """What the compiled main phases trace on a GPU, checked without one: dispatch to each
    backend, the fp16 layers and the op wrappers all stay in one graph, and the fast backends'
    graphs hold their custom ops (the reference's none). The backward and the training phases:
    tests/test_compiled_backward_fake_gpu.py."""
    reason = backends.unavailable_reason(impl, torch.device("cuda"), torch.float16)
    if reason is not None:
        pytest.skip(f"{impl} cannot run on a GPU here: {reason}")
    torch.manual_seed(6)
    G = Generator(4, 0, 4, 8, 3, channel_base=32, channel_max=4, conv_clamp=256, num_fp16_res=1,
                  mapping_kwargs=dict(num_layers=1))
    D = Discriminator(0, 8, 3, channel_base=32, channel_max=4, conv_clamp=256, num_fp16_res=1,
                      mapping_kwargs=dict(num_layers=1), epilogue_kwargs=dict(mbstd_group_size=2))
    ws = torch.randn(2, G.synthesis.num_ws, 4)
    batikfast.set_backend(impl)
    try:
        traced = {"mapping": _trace_on_fake_gpu(G.mapping, (torch.randn(2, 4), None)),
                  "synthesis": _trace_on_fake_gpu(G.synthesis, (ws,), dict(noise_mode="const")),
                  "D": _trace_on_fake_gpu(D, (torch.randn(2, 3, 8, 8), None,
                                              torch.tensor([3, 5])))}
    finally:
        batikfast.set_backend(None)
    if impl == "ref":
        assert traced == {"mapping": set(), "synthesis": set(), "D": set()}
    else:
        assert {"batikfast.modulated_conv2d.default", "batikfast.upfirdn2d.default",
                "batikfast.bias_act.default"} <= traced["synthesis"]
        assert {"batikfast.upfirdn2d.default", "batikfast.bias_act.default"} <= traced["D"]
        assert "batikfast.bias_act.default" in traced["mapping"]
