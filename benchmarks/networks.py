"""Whole networks between the op and the training-step benchmarks: G and D, forward and backward.

    python benchmarks/networks.py                    # GPU: paper256, batch 64
    python benchmarks/networks.py --quick            # CPU: tiny config, plumbing only

Times ``G(z, c)`` (mapping + synthesis) and ``D(img, c, t)`` of the training config, forward
and forward+backward (gradients of every parameter and of the input), per backend (ref /
triton / cuda), eager and under ``torch.compile``, fp32 and mixed precision (fp16 in the
highest resolutions, as paper256). Unlike the per-op sums of ``run.py`` this includes the
launch gaps and the glue between ops. Writes ``networks.{json,md}`` beside the op results.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import describe_error, unavailable_reason  # noqa: E402
from benchmarks.textfmt import fmt_float, fmt_speedup, fmt_spread  # noqa: E402

import torch  # noqa: E402

from benchmarks.train_step import PRECISIONS  # noqa: E402

NETWORKS = ("G", "D")
MODES = ("fwd", "fwd+bwd")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", default=None, help="training preset (default paper256; "
                                                     "--quick: tiny)")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--backends", nargs="+", choices=("ref", "triton", "cuda"),
                        default=["ref", "triton", "cuda"])
    parser.add_argument("--compile-modes", nargs="+", choices=("eager", "compiled"),
                        default=["eager", "compiled"])
    parser.add_argument("--precision", nargs="+", choices=sorted(PRECISIONS),
                        default=["mixed", "fp32"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch", type=common.positive_int, default=None, help="default 64; --quick: 4")
    parser.add_argument("--budget", type=common.positive_float, default=None,
                        help="seconds after which no new measurement starts")
    parser.add_argument("--rep-ms", type=common.positive_float, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", type=common.device_arg, default=None)
    parser.add_argument("--outdir", default=None)
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.quick else 64)
    common.settle_preset_and_setups(parser, args)
    return args


def build(args, device, precision):
    from batikfast.training.config import make_config, network_kwargs
    from batikfast.training.model import build_networks
    config = make_config(args.cfg, precision=PRECISIONS[precision])
    G_kwargs, D_kwargs = network_kwargs(config, c_dim=0, img_channels=3)
    G, D = build_networks(G_kwargs, D_kwargs, device)
    return config, G.requires_grad_(True), D.requires_grad_(True)


def make_callables(G, D, config, batch, device, compiled):
    """{(network, mode): no-argument function}."""
    torch.manual_seed(0)
    z = torch.randn([batch, G.z_dim], device=device)
    c = torch.zeros([batch, 0], device=device)
    res = config["resolution"]
    img = torch.randn([batch, 3, res, res], device=device)
    t = torch.randint(0, 1000, [batch], device=device)
    G_run = torch.compile(G) if compiled else G
    D_run = torch.compile(D) if compiled else D
    G_params = [p for p in G.parameters() if p.requires_grad]
    D_params = [p for p in D.parameters() if p.requires_grad]
    img_leaf = img.clone().requires_grad_(True)
    dy_img = torch.randn_like(img)

    def g_fwd():
        with torch.no_grad():
            return G_run(z, c)

    def g_bwd():
        out = G_run(z, c)
        return torch.autograd.grad(out, G_params, dy_img.to(out.dtype))

    def d_fwd():
        with torch.no_grad():
            return D_run(img, c, t)

    def d_bwd():
        logits = D_run(img_leaf, c, t)
        return torch.autograd.grad(logits.sum(), D_params + [img_leaf])

    return {("G", "fwd"): g_fwd, ("G", "fwd+bwd"): g_bwd,
            ("D", "fwd"): d_fwd, ("D", "fwd+bwd"): d_bwd}


def run(args, device, timer, rows: list) -> list[dict]:
    """Appends to ``rows`` as it goes, so an interrupted run keeps what it measured."""
    import batikfast
    started = time.perf_counter()
    for precision, compile_mode, backend in itertools.product(
            args.precision, args.compile_modes, args.backends):
        base = dict(backend=backend, compile=compile_mode, precision=precision, cfg=args.cfg,
                    batch=args.batch)
        setup_rows = [dict(base, network=n, mode=m) for n in args.networks for m in args.modes]
        rows.extend(setup_rows)
        reason = unavailable_reason(backend, device, torch.float32)
        if reason or (args.budget is not None and time.perf_counter() - started > args.budget):
            # Printed as well as recorded: an asked-for setup never vanishes from the terminal.
            for row in setup_rows:
                row["status"] = f"unavailable: {reason}" if reason else "skipped: time budget"
                _print_row(row)
            continue
        batikfast.set_backend(backend)
        try:
            config, G, D = build(args, device, precision)
            fns = make_callables(G, D, config, args.batch, device, compile_mode == "compiled")
            for row in setup_rows:
                try:
                    fn = fns[(row["network"], row["mode"])]
                    begin = time.perf_counter()
                    fn()
                    common.synchronize(device)
                    row["first_call_s"] = round(time.perf_counter() - begin, 2)
                    timing = timer(fn)
                    row.update(status="ok", ms=timing.median_ms, ms_p20=timing.p20_ms,
                               ms_p80=timing.p80_ms, images_per_s=args.batch
                               / (timing.median_ms * 1e-3))
                except Exception as error:
                    row["status"] = describe_error(error)
                _print_row(row)
        except Exception as error:
            for row in setup_rows:
                row.setdefault("status", describe_error(error))
                _print_row(row)
        finally:
            batikfast.set_backend(None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _add_speedups(rows)
    return rows


def _add_speedups(rows):
    ok = {(r["network"], r["mode"], r["precision"], r["backend"], r["compile"]): r
          for r in rows if r.get("status") == "ok"}
    for (network, mode, precision, _, _), row in ok.items():
        eager = ok.get((network, mode, precision, "ref", "eager"))
        compiled = ok.get((network, mode, precision, "ref", "compiled"))
        row["speedup_vs_ref"] = eager["ms"] / row["ms"] if eager else None
        row["speedup_vs_compiled"] = compiled["ms"] / row["ms"] if compiled else None


def _label(row) -> str:
    return f"{row['network']} {row['mode']} {row['backend']} {row['compile']} {row['precision']}"


def _print_row(row):
    if row.get("status") != "ok":
        print(f"  {_label(row):<36} {row.get('status')}", flush=True)
        return
    print(f"  {_label(row):<36} {fmt_float(row['ms']):>8} ms [{fmt_spread(row)}]  "
          f"{row['images_per_s']:.0f} img/s  (first call {row['first_call_s']} s)", flush=True)


def markdown(payload) -> str:
    meta, rows = payload["meta"], payload["results"]
    out = common.markdown_preamble(
        f"# batikfast networks ({meta['cfg']}, batch {meta['batch']}): {meta['device']}", meta,
        [f"- date {meta['date']}, commit `{meta.get('git_commit')}`; torch {meta['torch']}, "
         f"triton {meta['triton']}, CUDA {meta['cuda']}; timing: {meta['timing']}",
         "- fwd+bwd: gradients of every parameter (and of D's input image)"])
    out += ["| network | mode | precision | backend | compile | ms [20-80%] | images/s | "
            "x eager ref | x compiled ref |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row["network"], row["mode"], row["precision"], row["backend"], row["compile"]]
        if row.get("status") != "ok":
            out.append("| " + " | ".join(cells) + f" | {row.get('status')} | | | |")
            continue
        cells += [f"{fmt_float(row['ms'])} [{fmt_spread(row)}]", f"{row['images_per_s']:.0f}",
                  fmt_speedup(row.get("speedup_vs_ref")),
                  fmt_speedup(row.get("speedup_vs_compiled"))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.chosen_device(args.device)
    timer = common.script_timer(args, device)
    outdir = common.output_dir(args.outdir, device)  # proven writable before measuring
    meta = common.run_metadata(device)
    meta.update(cfg=args.cfg, batch=args.batch, timing=timer.method)
    print(f"batikfast networks ({args.cfg}, batch {args.batch}) on {meta['device']} "
          f"({meta['timing']})")
    rows = []
    if common.run_until_interrupted(lambda: run(args, device, timer, rows), meta, rows):
        _add_speedups(rows)
    payload = dict(meta=meta, results=rows)
    print(common.write_report(outdir, "networks", payload, markdown(payload)))
    return payload


if __name__ == "__main__":
    main()
