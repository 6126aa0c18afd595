"""batikfast's whole G and D beside NVIDIA's StyleGAN2 networks, same config, same weights.

    python benchmarks/peer_networks.py --nvidia-path .peer/stylegan3            # GPU: paper256
    python benchmarks/peer_networks.py --nvidia-path .peer/stylegan3 --quick    # CPU: tiny

NVIDIA's ``Generator`` and ``Discriminator`` come from ``--nvidia-path`` (their
``training/networks_stylegan2.py``, or ``training/networks.py`` of StyleGAN2-ADA); none of their
code is in this repository. Both sides are built from the same training preset (paper256:
fp16 in the 4 highest resolutions when mixed) and batikfast's networks load NVIDIA's state
dict, so they hold the same weights. Timed: G forward, G forward+backward (gradients of every
parameter), D forward+backward (of every parameter and of the input image), per batch and
precision; NVIDIA in training mode as their training runs it (``fused_modconv`` off, cuDNN
benchmark on, TF32 off), batikfast per backend with the same global settings.

batikfast's training D is conditioned on Diffusion-GAN's step t (``t_dim=1``: a small mapping
network of t and a projection onto its output); NVIDIA's StyleGAN2 D has no t. The D compared
here is batikfast's t-free configuration (``t_dim=0``), which is NVIDIA's D layer for layer.

Each NVIDIA row says which of their paths ran, ``nvidia-cuda`` (both plugins, bias_act and
upfirdn2d, loaded) or ``nvidia-ref`` with the reason; each batikfast row its speed-up over that
row and its largest deviation from NVIDIA's outputs (image or logits, and for forward+backward
every gradient, paired by parameter name), both sides drawing the same synthesis noise from
the same seed. Mixed precision is compared on a GPU only: NVIDIA's blocks run fp32 off CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import (Timer, describe_error, relative_errors,  # noqa: E402
                               unavailable_reason)
from benchmarks.textfmt import (fixed_columns, fmt_float, fmt_speedup, fmt_spread,  # noqa: E402
                                nvidia_comparison_cell)

import torch  # noqa: E402

import batikfast  # noqa: E402
from benchmarks.peer_nvidia import Nvidia, table_columns  # noqa: E402

MEASUREMENTS = ("G:fwd", "G:fwd+bwd", "D:fwd", "D:fwd+bwd")
DEFAULT_MEASUREMENTS = ("G:fwd", "G:fwd+bwd", "D:fwd+bwd")
OURS = ("ref", "triton", "cuda")
# NVIDIA's networks have fp16 as their only reduced precision.
PRECISIONS = {"mixed": "fp16", "fp32": "fp32"}
NOISE_SEED = 1234


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvidia-path", required=True,
                        help="checkout of NVlabs/stylegan3 or stylegan2-ada-pytorch")
    parser.add_argument("--cfg", default=None, help="training preset (default paper256; "
                                                     "--quick: tiny)")
    parser.add_argument("--measure", nargs="+", choices=MEASUREMENTS,
                        default=list(DEFAULT_MEASUREMENTS), help="network:mode pairs to time")
    parser.add_argument("--backends", nargs="+", choices=OURS, default=None,
                        help="batikfast backends (default all; --quick: ref, as interpreted "
                             "Triton takes minutes per network)")
    parser.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=None,
                        help="mixed (fp16 in the preset's num_fp16_res highest resolutions) or "
                             "fp32 (default both; --quick: fp32)")
    parser.add_argument("--batch", nargs="+", type=common.positive_int, default=None,
                        help="images per GPU (default 16 64; --quick: 4)")
    parser.add_argument("--quick", action="store_true", help="tiny config (CPU check)")
    parser.add_argument("--budget", type=common.positive_float, default=None,
                        help="seconds after which no new measurement starts")
    parser.add_argument("--rep-ms", type=common.positive_float, default=None)
    parser.add_argument("--outdir", default=None)
    parser.add_argument("--device", type=common.device_arg, default=None,
                        help="cuda or cpu (default: cuda if present)")
    args = parser.parse_args(argv)
    args.cfg = args.cfg or ("tiny" if args.quick else "paper256")
    args.backends = args.backends or (["ref"] if args.quick else list(OURS))
    args.precision = args.precision or (["fp32"] if args.quick else ["mixed", "fp32"])
    args.batch = args.batch or ([4] if args.quick else [16, 64])
    _check_config(parser, args)
    return args


def _check_config(parser, args) -> None:
    """Refuse a preset or batch that would make every row an error (and overwrite the results)."""
    from batikfast.training.config import PRESETS
    common.check_preset(parser, args.cfg)
    group = PRESETS[args.cfg]["mbstd_group"]
    for batch in args.batch:
        # Both minibatch-std layers split the batch into groups of min(group, batch).
        if batch % min(group, batch):
            parser.error(f"--batch {batch}: the {args.cfg} discriminator's minibatch-std group "
                         f"of {group} must divide it (or be at least the batch)")


# --------------------------------------------------------------------------- the networks

class NvidiaNetworks(Nvidia):
    """NVIDIA's ops (and which path they run) plus their StyleGAN2 G and D classes."""

    def __init__(self, path: str, device: torch.device):
        super().__init__(path, device)
        if self.flavour == "stylegan3":
            from training import networks_stylegan2 as networks
        else:
            from training import networks
        from torch_utils.ops import conv2d_gradfix
        self.Generator, self.Discriminator = networks.Generator, networks.Discriminator
        # As their training loop sets it (their custom op stays off on torch >= 1.11 anyway).
        conv2d_gradfix.enabled = True

    def network_path(self) -> tuple[str, str]:
        """Both plugins serve the networks: "cuda" only when both loaded."""
        failed = {op: why for op, (kind, why) in self.paths.items() if kind != "cuda"}
        if not failed:
            return "cuda", "CUDA plugins loaded (bias_act, upfirdn2d)"
        return "ref", "; ".join(f"{op}: {why}" for op, why in failed.items())

    def generator(self, G_kwargs: dict):
        kwargs = {k: v for k, v in G_kwargs.items() if k != "mixed_precision_dtype"}
        synthesis = {k: kwargs.pop(k) for k in ("channel_base", "channel_max", "num_fp16_res",
                                                "conv_clamp")}
        if self.flavour == "stylegan3":
            # Their train.py's StyleGAN2 setting: fused modulation for inference only.
            return self.Generator(**kwargs, **synthesis, fused_modconv_default="inference_only")
        # StyleGAN2-ADA turns fused modulation off in training by itself.
        return self.Generator(**kwargs, synthesis_kwargs=synthesis)

    def discriminator(self, D_kwargs: dict):
        return self.Discriminator(**{k: v for k, v in D_kwargs.items()
                                     if k != "mixed_precision_dtype"})


def build_pair(nvidia: NvidiaNetworks, cfg: str, precision: str, device: torch.device) -> dict:
    """{"nvidia": (G, D), "batikfast": (G, D)}: same config, the same weights, training mode."""
    from batikfast.training.config import make_config, network_kwargs
    from batikfast.training.model import build_networks
    config = make_config(cfg, precision=PRECISIONS[precision])
    G_kwargs, D_kwargs = network_kwargs(config, c_dim=0, img_channels=3)
    torch.manual_seed(0)
    theirs = (nvidia.generator(G_kwargs), nvidia.discriminator(D_kwargs))
    for net in theirs:
        _vary_constant_parameters(net)
    ours = build_networks(G_kwargs, dict(D_kwargs, t_dim=0), "cpu")
    for mine, their in zip(ours, theirs):
        mine.load_state_dict(their.state_dict(), strict=True)
    return {side: tuple(net.to(device).train().requires_grad_(True) for net in nets)
            for side, nets in (("nvidia", theirs), ("batikfast", ours))}


@torch.no_grad()
def _vary_constant_parameters(net: torch.nn.Module) -> None:
    # A fresh network has zero biases and noise strengths: the deviation check would not see
    # a wrong bias or noise path. Small random values make those paths count.
    for param in net.parameters():
        if param.numel() > 0 and bool((param == param.flatten()[0]).all()):
            param.add_(0.1 * torch.randn_like(param))


def tensor_names(G, D) -> dict:
    """{"G:fwd": [...], ...}: what each callable returns, in order, for the report."""
    G_grads = [f"grad {name}" for name, _ in _parameters_by_name(G)]
    D_grads = [f"grad {name}" for name, _ in _parameters_by_name(D)]
    return {"G:fwd": ["image"], "G:fwd+bwd": ["image", *G_grads], "D:fwd": ["logits"],
            "D:fwd+bwd": ["logits", *D_grads, "grad img"]}


def _parameters_by_name(net) -> list:
    # By name, not registration order: the two implementations may register modules in
    # different orders, and the check pairs their gradients by position.
    return sorted(((n, p) for n, p in net.named_parameters() if p.requires_grad),
                  key=lambda item: item[0])


def make_callables(G, D, batch: int, device: torch.device) -> dict:
    """{"G:fwd": fn, ...}: each fn runs one call and returns what the check compares."""
    generator = torch.Generator().manual_seed(0)  # the same inputs for both sides
    z = torch.randn([batch, G.z_dim], generator=generator).to(device)
    c = torch.zeros([batch, 0], device=device)
    res = G.img_resolution
    img = torch.randn([batch, G.img_channels, res, res], generator=generator).to(device)
    dy = torch.randn(img.shape, generator=generator).to(device)
    img_leaf = img.clone().requires_grad_(True)
    G_params = [p for _, p in _parameters_by_name(G)]
    D_params = [p for _, p in _parameters_by_name(D)]

    def g_fwd():
        with torch.no_grad():
            return (G(z, c),)

    def g_bwd():
        out = G(z, c)
        return (out.detach(), *torch.autograd.grad(out, G_params, dy.to(out.dtype)))

    def d_fwd():
        with torch.no_grad():
            return (D(img, c),)

    def d_bwd():
        logits = D(img_leaf, c)
        return (logits.detach(), *torch.autograd.grad(logits.sum(), D_params + [img_leaf]))

    return {"G:fwd": g_fwd, "G:fwd+bwd": g_bwd, "D:fwd": d_fwd, "D:fwd+bwd": d_bwd}


def seeded_call(fn, device: torch.device):
    """fn() with the synthesis noise drawn from NOISE_SEED: both sides draw the same noise
    (the same shapes in the same layer order), so their outputs can be compared."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(NOISE_SEED)
        return fn()


# --------------------------------------------------------------------------- run

def run(args, nvidia: NvidiaNetworks, device: torch.device, timer: Timer,
        rows: list) -> list[dict]:
    """Appends to ``rows`` as it goes, so an interrupted run keeps what it measured."""
    started = time.perf_counter()
    _print_header()
    for precision in args.precision:
        nets, build_error = None, mixed_unavailable(precision, device)
        for batch in args.batch:
            for measurement in args.measure:
                network, mode = measurement.split(":")
                base = dict(measurement=measurement, network=network, mode=mode,
                            precision=precision, batch=batch, cfg=args.cfg)
                if args.budget is not None and time.perf_counter() - started > args.budget:
                    # printed too: a skipped measurement never vanishes from the terminal
                    _skip(rows, base, "skipped: time budget")
                    continue
                if nets is None and build_error is None:
                    try:
                        nets = build_pair(nvidia, args.cfg, precision, device)
                    except Exception as error:  # once per precision, not once per row
                        build_error = describe_error(error)
                if build_error is not None:
                    _skip(rows, base, build_error)
                    continue
                _run_measurement(args, nvidia, nets, device, timer, base, rows)
        del nets
        _free(device)
    return rows


def mixed_unavailable(precision: str, device: torch.device) -> str | None:
    """Why mixed precision cannot be compared here; None when it can."""
    if precision == "mixed" and device.type != "cuda":
        # Their blocks set force_fp32 for tensors off CUDA: an fp16 batikfast row would be
        # compared with an fp32 NVIDIA one.
        return ("unavailable: NVIDIA's networks run every layer in fp32 off CUDA "
                "(force_fp32), so mixed precision is compared on a GPU only")
    return None


def _skip(rows: list, base: dict, status: str) -> None:
    rows.append(dict(base, impl="all", status=status))
    _print_row(rows[-1])


def _run_measurement(args, nvidia, nets, device, timer, base, rows: list) -> None:
    kind, why = nvidia.network_path()
    peer = dict(base, impl=f"nvidia-{kind}", path_note=why)
    rows.append(peer)
    peer_outputs = _measure(peer, nets["nvidia"], base, device, timer)
    _print_row(peer)
    for backend in args.backends:
        row = dict(base, impl=f"batikfast-{backend}")
        rows.append(row)
        reason = unavailable_reason(backend, device, torch.float32)
        if reason is not None:
            row["status"] = f"unavailable: {reason}"
            _print_row(row)
            continue
        batikfast.set_backend(backend)
        try:
            outputs = _measure(row, nets["batikfast"], base, device, timer)
        finally:
            batikfast.set_backend(None)
        if outputs is not None and peer_outputs is not None:
            names = tensor_names(*nets["nvidia"])[base["measurement"]]
            row.update(deviations(outputs, peer_outputs, names))
        if row["status"] == "ok" and peer.get("status") == "ok":
            row["speedup_vs_nvidia"] = peer["ms"] / row["ms"]
        del outputs
        _print_row(row)
    del peer_outputs
    _free(device)


def deviations(outputs, reference, names) -> dict:
    """The largest deviation from NVIDIA's tensors, where it is, and the output's own.

    Per tensor as the op benchmarks measure it (:func:`benchmarks.common.relative_errors`).
    A sum with much cancellation (the gradient of a noise strength) deviates most in fp16.
    """
    errors = relative_errors(list(zip(outputs, reference)))
    worst = max(range(len(errors)), key=errors.__getitem__)
    return dict(max_rel_err_vs_nvidia=errors[worst], worst_tensor=names[worst],
                output_rel_err_vs_nvidia=errors[0])


def _measure(row: dict, networks: tuple, base: dict, device, timer):
    """Times one side into ``row``; returns its seeded outputs, or None when it failed."""
    try:
        fns = make_callables(*networks, base["batch"], device)
        fn = fns[base["measurement"]]
        begin = time.perf_counter()
        outputs = seeded_call(fn, device)  # the first call: compiles, tunes cuDNN
        common.synchronize(device)
        row["first_call_s"] = round(time.perf_counter() - begin, 2)
        timing = timer(fn)
    except Exception as error:
        row["status"] = describe_error(error)
        return None
    row.update(status="ok", ms=timing.median_ms, ms_p20=timing.p20_ms, ms_p80=timing.p80_ms,
               repeats=timing.repeats, images_per_s=base["batch"] / (timing.median_ms * 1e-3))
    return outputs


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


_WIDTHS = (10, 6, 5, 16, 9, 17, 9, 8)


def _print_header():
    names = ("network", "prec", "batch", "impl", "ms", "p20-p80", "x nvidia", "first s")
    print(fixed_columns(names, _WIDTHS) + " err-vs-nvidia / status")


def _print_row(row):
    ok = row.get("status") == "ok"
    values = (row["measurement"], row["precision"], row["batch"], row["impl"],
              fmt_float(row["ms"]) if ok else "-", fmt_spread(row) if ok else "-",
              fmt_speedup(row.get("speedup_vs_nvidia")),
              row.get("first_call_s", "-") if ok else "-")
    if not ok:
        tail = row.get("status")
    elif row.get("max_rel_err_vs_nvidia") is not None:
        tail = (f"{row['max_rel_err_vs_nvidia']:.1e} in {row['worst_tensor']} "
                f"(output {row['output_rel_err_vs_nvidia']:.0e})")
    else:  # NVIDIA's row: the header printed the whole reason
        tail = row.get("path_note", "")[:60]
    print(fixed_columns(values, _WIDTHS) + f" {tail}", flush=True)


# --------------------------------------------------------------------------- report

def markdown(payload: dict) -> str:
    meta, rows = payload["meta"], payload["results"]
    kind, why = meta["nvidia_network_path"]
    out = common.markdown_preamble(
        f"# batikfast vs NVIDIA {meta['nvidia_flavour']} networks ({meta['cfg']}): "
        f"{meta['device']}", meta,
        [f"- date {meta['date']}, batikfast commit `{meta.get('git_commit')}`, NVIDIA code "
         f"from `{meta['nvidia_path']}` ({meta['nvidia_flavour']})",
         f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
         f"timing: {meta['timing']}; cuDNN benchmark {meta['cudnn_benchmark']}, TF32 "
         f"{'on' if meta['tf32_cudnn'] else 'off'} (both trainings' settings)",
         f"- NVIDIA path that ran: **{kind}** ({why})",
         f"- {meta['compared']}"])
    out += ["Each cell: median ms [20-80%], speed-up over NVIDIA's path that ran, the largest "
            "deviation from NVIDIA's tensors (output, and in fwd+bwd every gradient) relative "
            "to each one's largest value, naming the tensor when above 1e-2, and the output's "
            "own deviation.", ""]
    impls = table_columns(rows)
    skipped = sum(r["impl"] == "all" and r.get("status", "").startswith("skipped")
                  for r in rows)
    if skipped:
        out += [f"{skipped} measurement(s) skipped: time budget of {meta.get('budget_s')} s "
                "reached.", ""]
    groups = {}
    for row in rows:
        groups.setdefault((row["precision"], row["batch"]), {}).setdefault(
            row["measurement"], {})[row["impl"]] = row
    for (precision, batch), by_measurement in groups.items():
        out += [f"## {precision}, batch {batch}", "",
                "| network | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
        for measurement, cells in by_measurement.items():
            out.append(f"| {measurement} | " + " | ".join(
                nvidia_comparison_cell(cells.get(i) or cells.get("all"), with_spread=True)
                for i in impls) + " |")
        out.append("")
    return "\n".join(out) + "\n"


COMPARED = ("batikfast's D is its t-free configuration (t_dim=0, NVIDIA's StyleGAN2 D); the "
            "Diffusion-GAN D batikfast trains adds a small mapping network of t. Both G's are "
            "in training mode; batikfast's mapping also updates w_avg there (NVIDIA's only "
            "when asked, update_emas), a [w_dim] lerp per call.")


@contextlib.contextmanager
def training_settings():
    """What both training loops set (TF32 off for accuracy, cuDNN picking its algorithms),
    undone afterwards: a caller in the same process (a test) keeps its own settings."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.chosen_device(args.device)
    outdir = common.output_dir(args.outdir, device)  # proven writable before measuring
    with training_settings():
        payload = measure(args, device)
    print("\n" + common.write_report(outdir, "peer_networks", payload, markdown(payload)))
    return payload


def measure(args, device: torch.device) -> dict:
    """{"meta": ..., "results": rows}, the rows measured so far when interrupted."""
    nvidia = NvidiaNetworks(args.nvidia_path, device)
    timer = common.script_timer(args, device)
    meta = common.run_metadata(device)
    meta.update(benchmark="peer_networks", timing=timer.method, budget_s=args.budget,
                cfg=args.cfg, nvidia_path=str(args.nvidia_path), nvidia_flavour=nvidia.flavour,
                nvidia_paths=nvidia.paths, nvidia_network_path=nvidia.network_path(),
                cudnn_benchmark=torch.backends.cudnn.benchmark, compared=COMPARED)
    print(f"batikfast vs NVIDIA {nvidia.flavour} networks ({args.cfg}) on {meta['device']} "
          f"({meta['timing']})")
    print("  NVIDIA path: {} ({})".format(*meta["nvidia_network_path"]))
    rows = []
    common.run_until_interrupted(lambda: run(args, nvidia, device, timer, rows), meta, rows)
    return dict(meta=meta, results=rows)


if __name__ == "__main__":
    main()
