"""How each op is called, fed and counted in the benchmarks.

For every op: ``make_inputs`` builds the tensors of a :class:`~benchmarks.shapes.Case`,
``call`` runs ``batikfast.ops`` with a given ``impl``, ``grad_inputs`` lists what the backward
differentiates, and ``cost`` counts the minimal bytes (every input read once, every output
written once, by hand per op) and the useful FLOPs (convolutions: ``2*N*Hin*Win*O*I*kh*kw``,
the multiply-adds of the convolution, not of zeros a transposed convolution inserts).
Forward+backward counts add the backward's own tensors: for the convolutions three times the
forward FLOPs (forward, input gradient, weight gradient).
"""
from __future__ import annotations

import math

import torch

from benchmarks.shapes import DIFFUSION_STEPS, Case

MODES = ("fwd", "fwd+bwd")
# Double backward, as R1 and path-length regularisation run it: the gradient with
# create_graph, a squared-norm penalty on it, and that penalty's gradient. Optional.
DOUBLE_BACKWARD = "fwd+bwd2"
ALL_MODES = MODES + (DOUBLE_BACKWARD,)
RESAMPLE_TAPS = [1, 3, 3, 1]


def _ops():
    from batikfast import ops
    return ops


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _tensor(shape, dtype, device, requires_grad, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_(requires_grad)


# --------------------------------------------------------------------------- bias_act

def _bias_act_inputs(case, batch, dtype, device, grad):
    p = case.params
    return dict(x=_tensor([batch, p["channels"], p["res"], p["res"]], dtype, device, grad),
                b=_tensor([p["channels"]], dtype, device, grad))


def _bias_act_call(inputs, impl, case):
    p = case.params
    return _ops().bias_act(inputs["x"], inputs["b"], dim=1, act=p["act"], clamp=p["clamp"],
                           impl=impl)


def _bias_act_cost(case, batch, dtype, mode):
    p = case.params
    numel = batch * p["channels"] * p["res"] ** 2
    es = _element_size(dtype)
    if mode == "fwd":
        return es * (2 * numel + p["channels"]), 0
    # forward x, b -> y; backward dy, x, b -> dx, db
    return es * (5 * numel + 3 * p["channels"]), 0


# --------------------------------------------------------------------------- upfirdn2d

def _upfirdn2d_inputs(case, batch, dtype, device, grad):
    p = case.params
    return dict(x=_tensor([batch, p["channels"], p["res"], p["res"]], dtype, device, grad),
                f=_ops().setup_filter(RESAMPLE_TAPS, device=device))


def _upfirdn2d_call(inputs, impl, case):
    ops = _ops()
    if case.params["mode"] == "up2":
        return ops.upsample2d(inputs["x"], inputs["f"], up=2, impl=impl)
    return ops.downsample2d(inputs["x"], inputs["f"], down=2, impl=impl)


def _upfirdn2d_cost(case, batch, dtype, mode):
    p = case.params
    numel_in = batch * p["channels"] * p["res"] ** 2
    numel_out = numel_in * 4 if p["mode"] == "up2" else numel_in // 4
    moved = _element_size(dtype) * (numel_in + numel_out)
    return (moved if mode == "fwd" else 2 * moved), 0


# --------------------------------------------------------------------------- modulated_conv2d

def _modconv_inputs(case, batch, dtype, device, grad):
    p = case.params
    inputs = dict(
        x=_tensor([batch, p["in_channels"], p["in_res"], p["in_res"]], dtype, device, grad),
        # Parameters stay float32 as in training; the op casts them.
        weight=_tensor([p["out_channels"], p["in_channels"], p["kernel"], p["kernel"]],
                       torch.float32, device, grad),
        styles=_tensor([batch, p["in_channels"]], torch.float32, device, grad,
                       scale=1.0 if p["demodulate"] else 1 / math.sqrt(p["in_channels"])),
        bias=_tensor([p["out_channels"]], dtype, device, grad, scale=0.1),
        noise=(_tensor([batch, 1, p["out_res"], p["out_res"]], dtype, device, False, scale=0.1)
               if p["noise"] else None),
        f=_ops().setup_filter(RESAMPLE_TAPS, device=device) if p["up"] > 1 else None,
    )
    return inputs


def _modconv_call(inputs, impl, case):
    p = case.params
    # NVIDIA's SynthesisLayer: correlation without up-sampling, convolution with it; the
    # training path scales activations around one shared convolution (fused_modconv=False).
    return _ops().modulated_conv2d(
        inputs["x"], inputs["weight"], inputs["styles"], noise=inputs["noise"], up=p["up"],
        padding=p["kernel"] // 2, resample_filter=inputs["f"], demodulate=p["demodulate"],
        flip_weight=p["up"] == 1, fused_modconv=False, impl=impl, bias=inputs["bias"],
        act=p["act"], clamp=p["clamp"])


def _conv_flops(p, batch):
    return 2 * batch * p["in_res"] ** 2 // (p.get("down", 1) ** 2) * p["out_channels"] \
        * p["in_channels"] * p["kernel"] ** 2


def _modconv_cost(case, batch, dtype, mode):
    p = case.params
    es = _element_size(dtype)
    x = batch * p["in_channels"] * p["in_res"] ** 2
    y = batch * p["out_channels"] * p["out_res"] ** 2
    noise = batch * p["out_res"] ** 2 if p["noise"] else 0
    params = 4 * (p["out_channels"] * p["in_channels"] * p["kernel"] ** 2
                  + batch * p["in_channels"]) + es * p["out_channels"]
    forward = es * (x + y + noise) + params
    flops = _conv_flops(p, batch)
    if mode == "fwd":
        return forward, flops
    # backward reads dy, x and the parameters, writes dx and every parameter gradient
    return forward + es * (y + 2 * x) + 2 * params, 3 * flops


# --------------------------------------------------------------------------- conv2d_resample

def _conv_inputs(case, batch, dtype, device, grad):
    p = case.params
    scale = 1 / math.sqrt(p["in_channels"] * p["kernel"] ** 2)
    return dict(
        x=_tensor([batch, p["in_channels"], p["in_res"], p["in_res"]], dtype, device, grad),
        w=_tensor([p["out_channels"], p["in_channels"], p["kernel"], p["kernel"]], dtype, device,
                  grad, scale=scale),
        f=_ops().setup_filter(RESAMPLE_TAPS, device=device))


def _conv_call(inputs, impl, case):
    p = case.params
    return _ops().conv2d_resample(inputs["x"], inputs["w"], f=inputs["f"], down=p["down"],
                                  padding=p["kernel"] // 2, flip_weight=True, impl=impl)


def _conv_cost(case, batch, dtype, mode):
    p = case.params
    es = _element_size(dtype)
    x = batch * p["in_channels"] * p["in_res"] ** 2
    y = batch * p["out_channels"] * p["out_res"] ** 2
    w = p["out_channels"] * p["in_channels"] * p["kernel"] ** 2
    flops = _conv_flops(p, batch)
    if mode == "fwd":
        return es * (x + w + y), flops
    return es * (x + w + y) + es * (y + 2 * x + 2 * w), 3 * flops


# --------------------------------------------------------------------------- diffusion_noise

def diffusion_schedule(device, steps: int = DIFFUSION_STEPS):
    """Diffusion-GAN's linear betas 1e-4..2e-2; index 0 is the clean image."""
    betas = torch.linspace(1e-4, 2e-2, steps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    one = torch.ones(1, dtype=torch.float64)
    sqrt_alpha_bar = torch.cat([one, alpha_bar.sqrt()])
    sqrt_one_minus = torch.cat([one * 0, (1 - alpha_bar).sqrt()])
    return sqrt_alpha_bar.float().to(device), sqrt_one_minus.float().to(device)


def _noise_inputs(case, batch, dtype, device, grad):
    p = case.params
    sqrt_alpha_bar, sqrt_one_minus = diffusion_schedule(device)
    return dict(x=_tensor([batch, p["channels"], p["res"], p["res"]], dtype, device, grad),
                t=torch.randint(0, DIFFUSION_STEPS, [batch], device=device),
                sqrt_alpha_bar=sqrt_alpha_bar, sqrt_one_minus=sqrt_one_minus)


def _noise_call(inputs, impl, case):
    # No `noise` and no seed: the fast paths draw eps in-kernel, as training calls it.
    return _ops().diffusion_noise(inputs["x"], inputs["t"], inputs["sqrt_alpha_bar"],
                                  inputs["sqrt_one_minus"], noise_std=0.05, impl=impl)


def _noise_cost(case, batch, dtype, mode):
    p = case.params
    numel = batch * p["channels"] * p["res"] ** 2
    moved = _element_size(dtype) * 2 * numel
    return (moved if mode == "fwd" else 2 * moved), 0


# --------------------------------------------------------------------------- registry

# Case parameters that only set tensor sizes; the op calls read none of them.
_SIZE_PARAMS = frozenset({"channels", "res", "in_channels", "out_channels", "in_res", "out_res"})
_compiled_forwards: dict = {}


def _compiled_forward(case, inputs, impl, call, names, dynamic):
    """One ``torch.compile``d forward per op variant (structure, not sizes) when dynamic.

    Reusing the same compiled function lets one dynamic-shape graph serve every layer of a
    variant instead of compiling each layer again (minutes over the paper256 shapes).
    """
    structure = tuple(sorted((k, v) for k, v in case.params.items() if k not in _SIZE_PARAMS))
    absent = tuple(sorted(k for k, v in inputs.items() if v is None))
    key = (case.op, impl, call, tuple(names), absent, structure)
    if not dynamic:
        key += (case.name, tuple(tuple(inputs[n].shape) for n in names))
    if key not in _compiled_forwards:
        template = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}

        def forward(*tensors):
            return call(dict(template, **dict(zip(names, tensors))), impl, case)
        _compiled_forwards[key] = torch.compile(forward, dynamic=dynamic)
    return _compiled_forwards[key]


class NotApplicable(Exception):
    """This case has nothing to time in this mode."""


class OpSpec:
    def __init__(self, make_inputs, call, grad_names, cost, deterministic=True, linear=False):
        self.make_inputs = make_inputs
        self.call = call
        self.grad_names = grad_names
        self.cost = cost
        self.deterministic = deterministic
        # Linear in its inputs: the gradient does not depend on them (no double backward).
        self.linear = linear


OPS = {
    "bias_act": OpSpec(_bias_act_inputs, _bias_act_call, ("x", "b"), _bias_act_cost),
    "upfirdn2d": OpSpec(_upfirdn2d_inputs, _upfirdn2d_call, ("x",), _upfirdn2d_cost,
                        linear=True),
    "modulated_conv2d": OpSpec(_modconv_inputs, _modconv_call,
                               ("x", "weight", "styles", "bias"), _modconv_cost),
    "conv2d_resample": OpSpec(_conv_inputs, _conv_call, ("x", "w"), _conv_cost),
    "diffusion_noise": OpSpec(_noise_inputs, _noise_call, ("x",), _noise_cost,
                              deterministic=False, linear=True),
}


def make_inputs(case: Case, batch: int, dtype: torch.dtype, device: torch.device,
                mode: str, channels_last: bool = False) -> dict:
    inputs = OPS[case.op].make_inputs(case, batch, dtype, device, mode != "fwd")
    if channels_last:  # same values, NHWC memory; leaves keep requires_grad
        for name in ("x", "noise"):
            tensor = inputs.get(name)
            if tensor is not None and tensor.ndim == 4:
                inputs[name] = tensor.detach().contiguous(memory_format=torch.channels_last) \
                    .requires_grad_(tensor.requires_grad)
    return inputs


def grad_tensors(case: Case, inputs: dict) -> list[torch.Tensor]:
    return [inputs[name] for name in OPS[case.op].grad_names]


def cost(case: Case, batch: int, dtype: torch.dtype, mode: str) -> tuple[int | None, int | None]:
    """(minimal bytes moved, useful FLOPs) of one call; (None, None) where not counted
    (the double backward: its minimal traffic depends on what each implementation saves)."""
    if mode == DOUBLE_BACKWARD:
        return None, None
    return OPS[case.op].cost(case, batch, dtype, mode)


def make_callable(case: Case, inputs: dict, impl: str, mode: str, compiled: bool = False,
                  dynamic: bool = True, call=None):
    """A no-argument function running one forward (or forward+backward) of the case.

    ``compiled`` wraps the whole call (the reference's ops) in ``torch.compile``; the
    backward then runs the compiled backward graph AOTAutograd made. ``call(inputs, impl,
    case)`` replaces the op's own call (the NVIDIA peer comparison uses it).
    """
    if mode == DOUBLE_BACKWARD and OPS[case.op].linear:
        raise NotApplicable(f"{case.op} is linear in its inputs: its gradient does not depend "
                            "on them, so there is no double backward to time")
    call = call or OPS[case.op].call
    names = sorted(k for k, v in inputs.items() if isinstance(v, torch.Tensor))
    if compiled:
        forward = _compiled_forward(case, inputs, impl, call, names, dynamic)
    else:
        def forward(*tensors):
            return call(dict(inputs, **dict(zip(names, tensors))), impl, case)
    tensors = [inputs[name] for name in names]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward(*tensors)
        return run
    wrt = grad_tensors(case, inputs)
    state = {}

    def upstream(y):
        if "dy" not in state:
            # Seeded so every implementation differentiates the same upstream gradient.
            generator = torch.Generator(device=y.device).manual_seed(1)
            state["dy"] = torch.randn(y.shape, generator=generator, device=y.device,
                                      dtype=y.dtype)
        return state["dy"]

    def run_with_backward():
        y = forward(*tensors)
        return torch.autograd.grad(y, wrt, upstream(y))

    def run_with_double_backward():
        y = forward(*tensors)
        grads = torch.autograd.grad(y, wrt, upstream(y), create_graph=True)
        dependent = [g for g in grads if g.requires_grad]
        if not dependent:
            raise NotApplicable(f"{case.op}: no gradient depends on the inputs")
        penalty = sum(g.float().square().sum() for g in dependent)
        return torch.autograd.grad(penalty, wrt, allow_unused=True)

    return run_with_double_backward if mode == DOUBLE_BACKWARD else run_with_backward
