"""R1 and path length compiled through torch.func (``compile_regularizers``), on the CPU.

The compiled inner gradients must give the eager penalties and the eager parameter gradients
(fp32 rounding apart): checked with Dynamo + AOTAutograd under the ``aot_eager`` backend (quick:
it traces, functionalises and differentiates the graphs inductor would get) and, marked slow, under
inductor itself. The training model runs a phase eagerly, saying so once, when compiling it
fails at its first call; the Triton ops' failure under torch.func is recorded as it stands.
"""
import pytest
import torch

import batikfast
from batikfast.augment import AugmentPipe
from batikfast.diffusion import Diffusion
from batikfast.loss import make_loss
from batikfast.training import model as training_model
from batikfast.training.config import make_config
from batikfast.training.distributed import DistInfo
from tests._support import require
from tests.test_loss import Z, tiny_networks

QUICK = {"backend": "aot_eager"}


@pytest.fixture(autouse=True)
def reference_ops(one_thread):
    batikfast.set_backend("ref")
    yield
    batikfast.set_backend(None)


def make(G, D, compile_regularizers, augment):
    # Same seeds in both losses: the same t and noise draws from the diffusion's own streams.
    return make_loss("stylegan2", G, D, diffusion=Diffusion(p=0.3, seed=7, impl="ref"),
                     augment_pipe=AugmentPipe.bgc(p=0.5) if augment else None,
                     compile_regularizers=compile_regularizers)


def run_phase(loss, phase, module, inputs, seed):
    module.zero_grad(set_to_none=True)
    module.requires_grad_(True)
    torch.manual_seed(seed)  # augmentation, style mixing and synthesis noise alike
    stats = loss.accumulate_gradients(phase, *inputs, gain=3.0)
    module.requires_grad_(False)
    return stats, {name: p.grad.clone() for name, p in module.named_parameters()
                   if p.grad is not None}


def fresh_inputs(generator):
    return (torch.randn([4, 3, 8, 8], generator=generator), None,
            torch.randn([4, Z], generator=generator), None)


def assert_fp32_close(actual, expected, what):
    # The sums of a few hundred fp32 products, in another order: relative 1e-4 of the largest.
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-6),
                               msg=lambda m: f"{what}: {m}")


def check_compiled_equals_eager(phase, compile_regularizers, augment=False, calls=2):
    G, D = tiny_networks()
    eager = make(G, D, None, augment)
    compiled = make(G, D, compile_regularizers, augment)
    module = D if phase.startswith("D") else G
    penalty = "r1_penalty" if phase.startswith("D") else "pl_penalty"
    generator = torch.Generator().manual_seed(1234)
    for call in range(calls):  # the second call reuses the compiled graph on new inputs
        inputs = fresh_inputs(generator)
        seed = int(torch.randint(1 << 30, [], generator=generator))
        eager_stats, eager_grads = run_phase(eager, phase, module, inputs, seed)
        compiled_stats, compiled_grads = run_phase(compiled, phase, module, inputs, seed)
        assert_fp32_close(compiled_stats[penalty], eager_stats[penalty], f"{penalty}, call {call}")
        assert sorted(compiled_grads) == sorted(eager_grads)
        for name, grad in eager_grads.items():
            assert_fp32_close(compiled_grads[name], grad, f"{phase} grad of {name}, call {call}")
        assert any(grad.abs().sum() > 0 for grad in compiled_grads.values())
    if phase.startswith("G"):
        assert_fp32_close(compiled.pl_mean, eager.pl_mean, "pl_mean")
    return compiled


@pytest.mark.parametrize("phase,augment", [("Dreg", True), ("Dreg", False), ("Dboth", True)])
def test_compiled_r1_penalty_and_d_gradients_equal_the_eager_ones(phase, augment):
    compiled = check_compiled_equals_eager(phase, QUICK, augment)
    assert compiled.compiled_regularizers() == ("Greg", "Dreg")


@pytest.mark.parametrize("phase", ["Greg", "Gboth"])
def test_compiled_path_length_penalty_and_g_gradients_equal_the_eager_ones(phase):
    check_compiled_equals_eager(phase, QUICK)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["Dreg", "Greg"])
def test_regularizers_compiled_by_inductor_equal_the_eager_ones(phase):
    # Inductor draws its own random numbers unless told to call aten's: the synthesis noise
    # must match the eager run's. (config.patch, not monkeypatch: pytest 9.2's monkeypatch
    # deletes the option on undo, which hides it from every later compile in the process.)
    with torch._inductor.config.patch(fallback_random=True):
        check_compiled_equals_eager(phase, {}, augment=True, calls=1)


def test_triton_ops_do_not_compile_under_torch_func_yet():
    """Documents torch 2.14's refusal; when this fails, the Triton path compiles: say so in
    batikfast/loss.py and DESIGN.md."""
    require("triton", "bias_act")
    G, D = tiny_networks()
    loss = make(G, D, QUICK, augment=False)
    batikfast.set_backend("triton")
    with pytest.raises(Exception, match="must override the setup_context staticmethod"):
        run_phase(loss, "Dreg", D, fresh_inputs(torch.Generator().manual_seed(0)), 0)


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def training_parts(log, compile=True, **overrides):
    G, D = tiny_networks()
    config = make_config("tiny", resolution=8, compile=compile, device="cpu", style_mixing=0.0,
                         **overrides)
    return training_model.TrainingParts(config, G, D, "cpu", log=log.append), G, D


def reg_phase_kwargs(seed):
    real, real_c, z, c = fresh_inputs(torch.Generator().manual_seed(seed))
    return dict(real_img=real, real_c=real_c, gen_z=z, gen_c=c, gain=4.0)


def test_training_model_compiles_the_regularisation_phases_and_says_so(monkeypatch):
    monkeypatch.setattr(training_model, "REG_COMPILE_OPTIONS", QUICK)
    log = []
    parts, G, D = training_parts(log)
    assert "Greg (path length) compiled" in parts.compile_note
    assert "Dreg (R1) compiled" in parts.compile_note
    for phase, module in (("Dreg", D), ("Greg", G)):
        module.requires_grad_(True)
        parts.accumulate_gradients(phase, **reg_phase_kwargs(0))
        module.requires_grad_(False)
    assert log == []
    assert parts.reg_loss.compiled_regularizers() == ("Greg", "Dreg")
    eager_note = training_parts([], compile=False)[0].compile_note
    assert eager_note == "torch.compile off: every phase runs eagerly"


def test_a_regularisation_phase_that_fails_to_compile_runs_eagerly_with_one_log_line(
        monkeypatch):
    monkeypatch.setattr(training_model, "REG_COMPILE_OPTIONS", {"backend": failing_backend})
    log = []
    parts, G, D = training_parts(log)
    D.requires_grad_(True)
    for call in range(2):
        D.zero_grad(set_to_none=True)
        parts.accumulate_gradients("Dreg", **reg_phase_kwargs(call))
        grads = {n: p.grad for n, p in D.named_parameters()}
        # the failed attempt's gradients are dropped: the retry's alone are left
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    D.requires_grad_(False)
    assert len(log) == 1, log
    assert log[0].startswith("torch.compile: Dreg (R1) falls back to eager: compiling it "
                             "failed at its first call with ")
    assert "this backend cannot compile anything" in log[0]
    assert torch.__version__ in log[0]
    assert parts.reg_loss.compiled_regularizers() == ("Greg",)
    assert "Dreg (R1) runs eagerly, compiling it failed" in parts.compile_note
    assert "Greg (path length) compiled" in parts.compile_note
    assert "Loss/r1_penalty" in parts.pop_stats(DistInfo(device=torch.device("cpu")))


def test_without_lazy_regularisation_gboth_falls_back_like_greg(monkeypatch):
    monkeypatch.setattr(training_model, "REG_COMPILE_OPTIONS", {"backend": failing_backend})
    log = []
    parts, G, D = training_parts(log, g_reg_interval=0)
    assert "(Gboth: main part eager)" in parts.compile_note
    G.requires_grad_(True)
    for call in range(2):
        parts.accumulate_gradients("Gboth", **reg_phase_kwargs(call))
    G.requires_grad_(False)
    assert len(log) == 1 and log[0].startswith("torch.compile: Gboth (path length) falls back")
    assert "Greg (path length) runs eagerly, compiling it failed" in parts.compile_note
    assert parts.reg_loss.compiled_regularizers() == ("Dreg",)
