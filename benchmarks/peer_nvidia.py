"""batikfast side by side with NVIDIA's StyleGAN2-ADA / StyleGAN3 ops at the same shapes.

    python benchmarks/peer_nvidia.py --nvidia-path .peer/stylegan3 [--batch 16 64] [--dtype fp16]

NVIDIA's code is imported from ``--nvidia-path`` (a checkout of NVlabs/stylegan3 or
NVlabs/stylegan2-ada-pytorch, kept in the git-ignored ``.peer/``); none of it is in this
repository. Compared per layer: ``bias_act``, ``upsample2d`` / ``downsample2d``, the synthesis
layer (their ``modulated_conv2d`` with ``fused_modconv=False`` as in training, then
``bias_act``) and the discriminator's ``conv2d_resample``.

Their ops JIT-compile a CUDA plugin on first use. When that fails, StyleGAN2-ADA warns and
falls back to its reference, StyleGAN3 raises; either way this script records which path ran,
``nvidia-cuda`` (plugin loaded) or ``nvidia-ref`` with the reason, and never passes the
reference off as their plugin. Each batikfast row also gives its largest deviation from
NVIDIA's result: a check that the two compute the same thing.
"""
from __future__ import annotations

import argparse
import sys
import time
import types
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import (DTYPES, Timer, describe_error, relative_error,  # noqa: E402
                               unavailable_reason)
from benchmarks.textfmt import (fixed_columns, fmt_float, fmt_speedup, fmt_spread,  # noqa: E402
                                nvidia_comparison_cell)

import torch  # noqa: E402

from benchmarks import opcases, shapes  # noqa: E402

PEER_OPS = ("bias_act", "upfirdn2d", "modulated_conv2d", "conv2d_resample")
OURS = ("ref", "triton", "cuda")


# --------------------------------------------------------------------------- NVIDIA's code

def _shim_pkg_resources() -> None:
    # Their conv2d_gradfix imports pkg_resources.parse_version, gone from recent setuptools.
    try:
        import pkg_resources  # noqa: F401
        return
    except ImportError:
        pass
    try:
        from packaging.version import parse as parse_version
    except ImportError:
        def parse_version(text):
            return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())
    sys.modules["pkg_resources"] = types.SimpleNamespace(parse_version=parse_version)


def _shim_requests() -> None:
    # Their dnnlib/util.py imports requests at the top but uses it only to download URLs, which
    # this benchmark never does; a machine without it (the GPU machine has no registry) must
    # still import their ops.
    try:
        import requests  # noqa: F401
        return
    except ImportError:
        pass
    module = types.ModuleType("requests")

    def unavailable(name):
        # AttributeError, as a module without the name raises: inspect and hasattr probe it.
        raise AttributeError(f"requests.{name}: requests is not installed (batikfast's peer "
                             "benchmark stands in for it; NVIDIA's URL downloads do not work)")

    module.__getattr__ = unavailable
    sys.modules["requests"] = module


class Nvidia:
    """NVIDIA's ops, and which of their paths (CUDA plugin or reference) each one runs."""

    def __init__(self, path: str, device: torch.device):
        root = Path(path).resolve()
        if not (root / "torch_utils" / "ops" / "bias_act.py").exists():
            raise SystemExit(f"--nvidia-path {path}: no torch_utils/ops/bias_act.py there; give "
                             "a checkout of NVlabs/stylegan3 or NVlabs/stylegan2-ada-pytorch")
        sys.path.insert(0, str(root))
        _shim_pkg_resources()
        _shim_requests()
        from torch_utils.ops import bias_act, conv2d_resample, upfirdn2d
        try:
            from training.networks_stylegan2 import modulated_conv2d  # StyleGAN3 layout
            self.flavour = "stylegan3"
        except ImportError:
            from training.networks import modulated_conv2d  # StyleGAN2-ADA layout
            self.flavour = "stylegan2-ada-pytorch"
        self.root = root
        self.bias_act_module, self.upfirdn2d_module = bias_act, upfirdn2d
        self.conv2d_resample = conv2d_resample.conv2d_resample
        self.modulated_conv2d = modulated_conv2d
        self.paths = {"bias_act": self._init_plugin(bias_act, device),
                      "upfirdn2d": self._init_plugin(upfirdn2d, device)}

    @staticmethod
    def _init_plugin(module, device: torch.device) -> tuple[str, str]:
        """("cuda" | "ref", why), after trying to build the plugin once."""
        if device.type != "cuda":
            result = ("ref", "CPU tensors: NVIDIA's ops run their reference")
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    ok = module._init()
                    error = None
                except Exception as exc:  # StyleGAN3 raises when the build fails
                    ok, error = False, exc
            if ok and getattr(module, "_plugin", None) is not None:
                return "cuda", "CUDA plugin loaded"
            why = (f"plugin build failed: {type(error).__name__}: {error}" if error is not None
                   else "; ".join(str(w.message) for w in caught) or "plugin init returned False")
            result = ("ref", " ".join(why.split())[:300])
        # Make every later call take their reference at once instead of retrying the build.
        module._init = lambda: False
        return result

    def path_of(self, op: str) -> tuple[str, str]:
        if op == "bias_act":
            return self.paths["bias_act"]
        if op == "upfirdn2d":
            return self.paths["upfirdn2d"]
        # The convolutions use both (modulated_conv2d: upfirdn2d + bias_act epilogue).
        kinds = {kind for kind, _ in self.paths.values()}
        if kinds == {"cuda"}:
            return "cuda", "CUDA plugins loaded"
        return "ref", "; ".join(f"{op}: {why}" for op, (kind, why) in self.paths.items()
                                if kind != "cuda")

    def call(self, inputs: dict, impl: str, case) -> torch.Tensor:
        p = case.params
        if case.op == "bias_act":
            return self.bias_act_module.bias_act(inputs["x"], inputs["b"], dim=1, act=p["act"],
                                                 clamp=p["clamp"], impl=impl)
        if case.op == "upfirdn2d":
            if p["mode"] == "up2":
                return self.upfirdn2d_module.upsample2d(inputs["x"], inputs["f"], up=2, impl=impl)
            return self.upfirdn2d_module.downsample2d(inputs["x"], inputs["f"], down=2,
                                                      impl=impl)
        if case.op == "modulated_conv2d":
            x = self.modulated_conv2d(
                x=inputs["x"], weight=inputs["weight"], styles=inputs["styles"],
                noise=inputs["noise"], up=p["up"], padding=p["kernel"] // 2,
                resample_filter=inputs["f"], demodulate=p["demodulate"],
                flip_weight=p["up"] == 1, fused_modconv=False)
            return self.bias_act_module.bias_act(x, inputs["bias"], act=p["act"],
                                                 clamp=p["clamp"], impl=impl)
        if case.op == "conv2d_resample":
            return self.conv2d_resample(x=inputs["x"], w=inputs["w"], f=inputs["f"],
                                        down=p["down"], padding=p["kernel"] // 2,
                                        flip_weight=True)
        raise ValueError(f"NVIDIA has no counterpart of {case.op}")


def describe_paths(paths: dict) -> str:
    """One line per plugin op of ``Nvidia.paths``: the path it takes and why."""
    return "\n".join(f"  NVIDIA {op}: {kind} ({why})" for op, (kind, why) in paths.items())


# --------------------------------------------------------------------------- run

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvidia-path", required=True,
                        help="checkout of NVlabs/stylegan3 or stylegan2-ada-pytorch")
    parser.add_argument("--ops", nargs="+", choices=PEER_OPS, default=list(PEER_OPS))
    parser.add_argument("--backends", nargs="+", choices=OURS, default=list(OURS),
                        help="batikfast implementations to put beside NVIDIA's")
    parser.add_argument("--shapes", nargs="+", choices=shapes.SHAPE_SETS, default=None)
    parser.add_argument("--batch", nargs="+", type=common.positive_int, default=None)
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--modes", nargs="+", choices=opcases.ALL_MODES,
                        default=list(opcases.MODES))
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU check)")
    parser.add_argument("--prepare", action="store_true",
                        help="only build (or load) NVIDIA's CUDA plugins, say which path each "
                             "op will take, and exit: gpu_check.sh builds them beside the "
                             "extension so that a later peer step measures at once")
    parser.add_argument("--budget", type=common.positive_float, default=None,
                        help="seconds after which no new measurement starts")
    parser.add_argument("--rep-ms", type=common.positive_float, default=None)
    parser.add_argument("--outdir", default=None)
    parser.add_argument("--device", type=common.device_arg, default=None, help="cuda or cpu (default: cuda if present)")
    args = parser.parse_args(argv)
    args.shapes = args.shapes or (["tiny"] if args.quick else ["paper256-g", "paper256-d"])
    args.batch = args.batch or ([2] if args.quick else [16, 64])
    args.dtype = args.dtype or (["fp32"] if args.quick else ["fp16", "fp32"])
    return args


def _measure(timer, device, row, fn):
    outputs = fn()
    common.synchronize(device)
    timing = timer(fn)
    row.update(status="ok", ms=timing.median_ms, ms_p20=timing.p20_ms, ms_p80=timing.p80_ms,
               repeats=timing.repeats,
               gbps=row["bytes"] / (timing.median_ms * 1e-3) / 1e9 if row["bytes"] else None,
               tflops=(row["flops"] / (timing.median_ms * 1e-3) / 1e12) if row["flops"] else None)
    return outputs


def run(args, nvidia: Nvidia, device: torch.device, timer: Timer, rows: list) -> list[dict]:
    """Appends to ``rows`` as it goes, so an interrupted run keeps what it measured."""
    started = time.perf_counter()
    _print_header()
    for shape_set in args.shapes:
        cases = [c for c in shapes.cases_for(shape_set) if c.op in args.ops]
        for batch in args.batch:
            for dtype_name in args.dtype:
                dtype = DTYPES[dtype_name]
                for case in cases:
                    for mode in args.modes:
                        nbytes, flops = opcases.cost(case, batch, dtype, mode)
                        base = dict(op=case.op, case=case.name, shape_set=shape_set, batch=batch,
                                    dtype=dtype_name, mode=mode, shape=case.describe(batch),
                                    bytes=nbytes, flops=flops)
                        if args.budget is not None and time.perf_counter() - started > args.budget:
                            # printed too: skipped cases vanished from the terminal
                            rows.append(dict(base, impl="all", status="skipped: time budget"))
                            _print_row(rows[-1])
                            continue
                        rows.extend(_run_case(args, nvidia, device, timer, case, batch, dtype,
                                              mode, base))
    return rows


def _run_case(args, nvidia, device, timer, case, batch, dtype, mode, base):
    torch.manual_seed(0)
    inputs = opcases.make_inputs(case, batch, dtype, device, mode)
    kind, why = nvidia.path_of(case.op)
    peer = dict(base, impl=f"nvidia-{kind}", path_note=why)
    rows = [peer]
    peer_outputs = None
    try:
        fn = opcases.make_callable(case, inputs, kind, mode, call=nvidia.call)
        peer_outputs = _measure(timer, device, peer, fn)
    except Exception as error:
        peer["status"] = describe_error(error)
    for impl in args.backends:
        row = dict(base, impl=f"batikfast-{impl}")
        rows.append(row)
        reason = unavailable_reason(impl, device, dtype)
        if reason is not None:
            row["status"] = f"unavailable: {reason}"
            continue
        try:
            outputs = _measure(timer, device, row, opcases.make_callable(case, inputs, impl, mode))
        except Exception as error:
            row["status"] = describe_error(error)
            continue
        row["max_rel_err_vs_nvidia"] = relative_error(outputs, peer_outputs)
        if peer.get("status") == "ok":
            row["speedup_vs_nvidia"] = peer["ms"] / row["ms"]
    for row in rows:
        _print_row(row)
    del inputs, peer_outputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


_WIDTHS = (18, 5, 7, 16, 8, 15, 9, 8, 8)


def _print_header():
    names = ("case", "dtype", "mode", "impl", "ms", "p20-p80", "x nvidia", "GB/s", "TFLOP/s")
    print(fixed_columns(names, _WIDTHS) + " err-vs-nvidia / status")


def _print_row(row):
    ok = row.get("status") == "ok"
    values = (row["case"], row["dtype"], row["mode"], row["impl"],
              fmt_float(row.get("ms")) if ok else "-", fmt_spread(row) if ok else "-",
              fmt_speedup(row.get("speedup_vs_nvidia")),
              fmt_float(row.get("gbps")) if ok else "-", fmt_float(row.get("tflops")))
    tail = row.get("status") if not ok else (
        f"{row['max_rel_err_vs_nvidia']:.1e}" if row.get("max_rel_err_vs_nvidia") is not None
        else row.get("path_note", ""))
    print(fixed_columns(values, _WIDTHS) + f" {tail}", flush=True)


def markdown(payload: dict) -> str:
    meta, rows = payload["meta"], payload["results"]
    out = common.markdown_preamble(
        f"# batikfast vs NVIDIA {meta['nvidia_flavour']} ops: {meta['device']}", meta,
        [f"- date {meta['date']}, batikfast commit `{meta.get('git_commit')}`, NVIDIA code "
         f"from `{meta['nvidia_path']}` ({meta['nvidia_flavour']})",
         f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
         f"timing: {meta['timing']}",
         "- NVIDIA paths that ran: " + "; ".join(
             f"{op}: **{kind}** ({why})" for op, (kind, why) in meta["nvidia_paths"].items())])
    out += ["Each cell: median ms, speed-up over NVIDIA's path that ran, and the largest "
            "deviation from NVIDIA's result relative to its largest value.", ""]
    groups = {}
    for row in rows:
        key = (row["shape_set"], row["batch"], row["dtype"], row["mode"])
        groups.setdefault(key, []).append(row)
    impls = table_columns(rows)
    skipped = sum(r["impl"] == "all" for r in rows)
    if skipped:
        out += [f"{skipped} case(s) skipped: time budget of {meta.get('budget_s')} s reached.", ""]
    for (shape_set, batch, dtype, mode), group in groups.items():
        out += [f"## {shape_set}, batch {batch}, {dtype}, {mode}", "",
                "| case | shape | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
        by_case = {}
        for row in group:
            by_case.setdefault(row["case"], {})[row["impl"]] = row
        for case, cells in by_case.items():
            shape = next(iter(cells.values()))["shape"]
            out.append(f"| {case} | {shape} | " + " | ".join(
                nvidia_comparison_cell(cells.get(i) or cells.get("all")) for i in impls) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def table_columns(rows: list[dict]) -> list[str]:
    """The implementations that head the peer reports' columns, in the order they ran.

    "all" marks a row that stands for every implementation (a case --budget skipped; in the
    network comparison also a precision whose networks could not be built): its cells say so,
    and with nothing else in the results the table keeps that one column (it had none, and
    broke)."""
    return list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != "all")) or ["all"]


def prepare(args) -> dict:
    """NVIDIA's plugins built into torch's extension cache (``TORCH_EXTENSIONS_DIR``), where
    the measuring runs load them in seconds: a minute or two of compiling off the clock."""
    device = common.chosen_device(args.device)
    started = time.perf_counter()
    nvidia = Nvidia(args.nvidia_path, device)
    print(f"NVIDIA {nvidia.flavour} plugins on {device} ({time.perf_counter() - started:.0f} s):")
    print(describe_paths(nvidia.paths))
    if device.type == "cuda" and any(kind != "cuda" for kind, _ in nvidia.paths.values()):
        raise SystemExit("NVIDIA's CUDA plugins are not all usable: the peer benchmarks will "
                         "time their reference for those ops (see above)")
    return dict(nvidia_flavour=nvidia.flavour, nvidia_paths=nvidia.paths)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.prepare:
        return prepare(args)
    device = common.chosen_device(args.device)
    outdir = common.output_dir(args.outdir, device)  # proven writable before measuring
    nvidia = Nvidia(args.nvidia_path, device)
    timer = common.script_timer(args, device)
    meta = common.run_metadata(device)
    meta.update(timing=timer.method, budget_s=args.budget, nvidia_path=str(args.nvidia_path),
                nvidia_flavour=nvidia.flavour, nvidia_paths=nvidia.paths)
    print(f"batikfast vs NVIDIA {nvidia.flavour} on {meta['device']} ({meta['timing']})")
    print(describe_paths(nvidia.paths))
    rows = []
    common.run_until_interrupted(lambda: run(args, nvidia, device, timer, rows), meta, rows)
    payload = dict(meta=meta, results=rows)
    print("\n" + common.write_report(outdir, "peer_nvidia", payload, markdown(payload)))
    return payload


if __name__ == "__main__":
    main()
