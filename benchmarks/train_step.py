"""The whole training step at paper256: images/s, sec/kimg and peak GPU memory per setup.

    python benchmarks/train_step.py                       # GPU: the default matrix below
    python benchmarks/train_step.py --backends cuda --compile-modes compiled --precision mixed
    python benchmarks/train_step.py --quick               # CPU: tiny config, plumbing only

Runs the real loop, ``batikfast.training.loop.Trainer.train_step`` (G main, path length,
D main, R1, diffusion, EMA, lazy regularisation intervals), for each combination of backend
(ref / triton / cuda), compilation (eager / compiled / cudagraphs: compiled with the main
phases in torch.compile's mode "reduce-overhead", i.e. CUDA graphs, GPUs only) and precision
(fp32 / mixed: fp16 in the 4 highest resolutions, as paper256). Timing covers whole cycles of
the lazy regularisation (16 steps: every phase in its true proportion) after warm-up steps
that absorb compilation. The real images are one fixed in-memory batch unless
``--real-data``, so the figure is the GPU step, not the data loader. Writes
``train_step.{json,md}`` beside the op results.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, profiling  # noqa: E402
from benchmarks.common import describe_error  # noqa: E402
from benchmarks.textfmt import fmt_float, fmt_speedup  # noqa: E402

import torch  # noqa: E402

PRECISIONS = {"fp32": "fp32", "mixed": "fp16", "bf16": "bf16"}
# --compile-modes: the training options each one sets (see measure_setup)
COMPILE_MODES = {"eager": dict(compile=False), "compiled": dict(compile=True),
                 "cudagraphs": dict(compile=True, cudagraphs=True)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", default=None, help="training preset (default paper256; "
                                                     "--quick: tiny)")
    parser.add_argument("--backends", nargs="+", choices=("ref", "triton", "cuda"),
                        default=["ref", "triton", "cuda"])
    parser.add_argument("--compile-modes", nargs="+", choices=tuple(COMPILE_MODES),
                        default=list(COMPILE_MODES),
                        help="cudagraphs: compiled, the main phases as CUDA graphs (--cudagraphs)")
    parser.add_argument("--precision", nargs="+", choices=sorted(PRECISIONS),
                        default=["mixed", "fp32"],
                        help="fp32, mixed (fp16 in the 4 highest resolutions) or bf16 (likewise)")
    parser.add_argument("--batch", type=common.positive_int, default=None, help="global batch (default 64)")
    parser.add_argument("--batch-gpu", type=common.positive_int, default=None,
                        help="images per round (default: the whole batch in one round)")
    parser.add_argument("--cycles", type=common.positive_int, default=None,
                        help="timed cycles of the 16-step lazy-regularisation schedule "
                             "(default 2; --quick: a couple of steps)")
    parser.add_argument("--warmup-steps", type=common.nonnegative_int, default=None,
                        help="untimed steps first (default 16: every phase compiles once)")
    parser.add_argument("--real-data", action="store_true",
                        help="feed the built-in dataset through the real loader")
    parser.add_argument("--budget", type=common.positive_float, default=None,
                        help="seconds after which no new setup starts")
    parser.add_argument("--no-phase-breakdown", action="store_true",
                        help="skip the extra cycle that times each phase separately")
    parser.add_argument("--profile", action="store_true",
                        help="one more cycle per setup under torch.profiler: its top GPU kernels "
                             "(CPU operators on the CPU) and launches per step, in the JSON and "
                             "the markdown")
    parser.add_argument("--trace-dir", default=None,
                        help="with --profile, also write each setup's Chrome / Perfetto trace "
                             "there (trace-<setup>.json.gz)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", type=common.device_arg, default=None)
    parser.add_argument("--outdir", default=None)
    args = parser.parse_args(argv)
    common.settle_preset_and_setups(parser, args)
    return args


class _QuietLog:
    def print(self, message):
        pass

    def scalars(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _fixed_batches(trainer):
    """The same uint8 batch forever: the step is measured without the data loader."""
    images, labels = [], []
    for index in range(trainer.batch_gpu):
        image, label = trainer.dataset[index % len(trainer.dataset)][:2]
        images.append(torch.as_tensor(image))
        labels.append(torch.as_tensor(label, dtype=torch.float32).reshape(-1))
    batch = (torch.stack(images), torch.stack(labels))
    if trainer.device.type == "cuda":
        batch = tuple(t.pin_memory() for t in batch)
    return itertools.repeat(batch)


def measure_setup(args, device, backend, compile_mode, precision, workdir,
                  batch_gpu: int | None = None) -> dict:
    import batikfast
    from batikfast.training.config import make_config
    from batikfast.training.distributed import DistInfo
    from batikfast.training.loop import Trainer

    overrides = dict(backend=backend, **COMPILE_MODES[compile_mode],
                     precision=PRECISIONS[precision], device=device.type, workers=4)
    if args.batch:
        overrides["batch"] = args.batch
    overrides["batch_gpu"] = batch_gpu or args.batch or None
    config = make_config(args.cfg, **overrides)
    if not batch_gpu:
        config["batch_gpu"] = config["batch"]
    batikfast.set_backend(backend)
    try:
        trainer = Trainer(config, workdir, DistInfo(device=device), log=_QuietLog())
        if args.real_data:
            from batikfast.data import make_loader
            loader = make_loader(trainer.dataset, trainer.batch_gpu, seed=config["seed"],
                                 num_workers=config["workers"],
                                 pin_memory=device.type == "cuda")
        else:
            loader = _fixed_batches(trainer)
        cycle = math.lcm(config["g_reg_interval"], config["d_reg_interval"])
        warmup = args.warmup_steps
        if warmup is None:
            warmup = 1 if args.quick else cycle
        steps = (args.cycles or 2) * cycle if not args.quick else (args.cycles or 2)
        begin = time.perf_counter()
        for _ in range(warmup):
            trainer.train_step(loader)
        common.synchronize(device)
        warmup_s = time.perf_counter() - begin
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        begin = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(loader)
        common.synchronize(device)
        seconds = time.perf_counter() - begin
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        phases = None
        if not args.no_phase_breakdown:
            phases = phase_breakdown(trainer, loader, device, 1 if args.quick else cycle)
        profile = None
        if args.profile:
            profile = _profile(args, trainer, loader, device, 1 if args.quick else cycle,
                               f"{backend}-{compile_mode}-{precision}")
    finally:
        batikfast.set_backend(None)
    images = steps * trainer.batch
    return dict(status="ok", steps=steps, warmup_steps=warmup, warmup_s=round(warmup_s, 2),
                seconds=seconds, images_per_s=images / seconds,
                sec_per_kimg=seconds / (images / 1000), peak_gpu_mem_gib=peak,
                batch=trainer.batch, batch_gpu=trainer.batch_gpu, phase_fractions=phases,
                profile=profile, compile_note=getattr(trainer.parts, "compile_note", None))


def _profile(args, trainer, loader, device, steps: int, setup: str) -> dict:
    """profiling.profile_top of ``steps`` more steps; a profiler that fails (no CUPTI, say)
    costs the setup its profile, not its measurement."""
    trace = Path(args.trace_dir) / f"trace-{setup}.json.gz" if args.trace_dir else None
    try:
        return profiling.profile_top(lambda: [trainer.train_step(loader) for _ in range(steps)],
                                     device, steps, trace_path=trace)
    except Exception as error:
        return dict(error=describe_error(error))


def phase_breakdown(trainer, loader, device, steps: int) -> dict | None:
    """Share of a step's time per training phase, from one extra, separately timed cycle.

    Synchronises around every phase, so it is not part of the headline figure; the rest
    (gradient reduction, optimiser steps, EMA, diffusion/augment adjustment) is "other".
    """
    parts = trainer.parts
    original = getattr(parts, "accumulate_gradients", None)
    if original is None:
        return None
    spent: dict[str, float] = {}

    def timed(phase, **kwargs):
        common.synchronize(device)
        begin = time.perf_counter()
        original(phase, **kwargs)
        common.synchronize(device)
        spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - begin

    try:
        parts.accumulate_gradients = timed
    except AttributeError:
        return None
    try:
        begin = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(loader)
        common.synchronize(device)
        total = time.perf_counter() - begin
    finally:
        del parts.accumulate_gradients
    fractions = {phase: seconds / total for phase, seconds in spent.items()}
    fractions["other"] = max(0.0, 1.0 - sum(fractions.values()))
    return fractions


# Under a time budget the first setups are the ones measured: the two baselines of the
# training-step target (eager and compiled reference) and the likely fastest setup first.
PRIORITY = [("eager", "ref"), ("compiled", "cuda"), ("compiled", "ref"), ("eager", "cuda"),
            ("compiled", "triton"), ("eager", "triton"), ("cudagraphs", "cuda"),
            ("cudagraphs", "triton"), ("cudagraphs", "ref")]


def measurement_order(args) -> list[tuple[str, str, str]]:
    """(precision, compile mode, backend) of every asked-for setup, precision by precision in
    the order given, each in PRIORITY order."""
    return sorted(itertools.product(args.precision, args.compile_modes, args.backends),
                  key=lambda s: (args.precision.index(s[0]), PRIORITY.index((s[1], s[2]))))


def run(args, device, rows: list | None = None) -> list[dict]:
    """Appends to ``rows`` as it goes, so an interrupted run keeps what it measured."""
    rows = [] if rows is None else rows
    started = time.perf_counter()
    for precision, compile_mode, backend in measurement_order(args):
        row = dict(config=f"{backend} {compile_mode} {precision}", backend=backend,
                   compile=compile_mode, precision=precision, cfg=args.cfg)
        rows.append(row)
        if args.budget is not None and time.perf_counter() - started > args.budget:
            row["status"] = "skipped: time budget"
        elif compile_mode == "cudagraphs" and device.type != "cuda":
            row["status"] = f"skipped: CUDA graphs need a GPU, not {device.type}"
        else:
            if backend == "triton" and device.type == "cpu":
                # Said before, not after: interpreted, each step takes minutes, not milliseconds.
                print(f"  {row['config']}: Triton runs interpreted on the CPU, minutes per step "
                      "(a correctness mode, not a timing; --budget skips the setups after it)",
                      flush=True)
            _measure_with_retries(args, device, backend, compile_mode, precision, row)
        _print_row(row)
    _add_speedups(rows)
    return rows


def _measure_with_retries(args, device, backend, compile_mode, precision, row) -> None:
    """Measure one setup; out of GPU memory with the whole batch in one round, halve the
    round (gradient accumulation, as the loop does) down to 8 images and say so."""
    from batikfast.training.config import PRESETS
    batch_gpu = args.batch_gpu
    while True:
        out_of_memory = False
        with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
            try:
                row.update(measure_setup(args, device, backend, compile_mode, precision,
                                         workdir, batch_gpu))
            except torch.cuda.OutOfMemoryError as error:
                out_of_memory = True
                row["status"] = describe_error(error)
            except Exception as error:
                row["status"] = describe_error(error)
        gc.collect()
        if device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
        tried = batch_gpu or args.batch or PRESETS[args.cfg]["batch"]
        if not out_of_memory or args.batch_gpu or tried <= 8:
            return
        batch_gpu = tried // 2
        row["note"] = f"out of GPU memory with {tried} images per round; retried with {batch_gpu}"
        print(f"  {row['config']}: {row['note']}", flush=True)


def _add_speedups(rows):
    for precision in {r["precision"] for r in rows}:
        same = {(r["backend"], r["compile"]): r for r in rows
                if r["precision"] == precision and r.get("status") == "ok"}
        eager_ref, compiled_ref = same.get(("ref", "eager")), same.get(("ref", "compiled"))
        for row in same.values():
            if eager_ref:
                row["speedup_vs_ref"] = eager_ref["sec_per_kimg"] / row["sec_per_kimg"]
            if compiled_ref:
                row["speedup_vs_compiled"] = compiled_ref["sec_per_kimg"] / row["sec_per_kimg"]


def _print_row(row):
    if row.get("status") != "ok":
        print(f"  {row['config']:<24} {row.get('status')}", flush=True)
        return
    print(f"  {row['config']:<24} {row['images_per_s']:8.1f} img/s  "
          f"{row['sec_per_kimg']:8.2f} s/kimg  "
          f"peak {fmt_float(row.get('peak_gpu_mem_gib'))} GiB  "
          f"({row['steps']} steps after {row['warmup_steps']} warm-up, {row['warmup_s']} s)",
          flush=True)


def markdown(payload) -> str:
    meta, rows = payload["meta"], payload["results"]
    out = common.markdown_preamble(
        f"# batikfast training step ({meta['cfg']}): {meta['device']}", meta,
        [f"- date {meta['date']}, commit `{meta.get('git_commit')}`; torch {meta['torch']}, "
         f"triton {meta['triton']}, CUDA {meta['cuda']}",
         f"- {meta['what']}"])
    out += ["| setup | images/s | sec/kimg | x eager ref | x compiled ref | peak GPU GiB | "
            "steps (warm-up s) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("status") != "ok":
            out.append(f"| {row['config']} | {row.get('status')} | | | | | |")
            continue
        if row.get("note"):
            row = dict(row, config=f"{row['config']} ({row['note']})")
        out.append(
            f"| {row['config']} | {row['images_per_s']:.1f} | {row['sec_per_kimg']:.2f} | "
            f"{fmt_speedup(row.get('speedup_vs_ref'))} | "
            f"{fmt_speedup(row.get('speedup_vs_compiled'))} | "
            f"{fmt_float(row.get('peak_gpu_mem_gib'))} | {row['steps']} ({row['warmup_s']} s) |")
    with_phases = [r for r in rows if r.get("phase_fractions")]
    if with_phases:
        names = list(dict.fromkeys(p for r in with_phases for p in r["phase_fractions"]))
        out += ["", "Share of the step per phase (one extra cycle, synchronised around each "
                "phase; G/D main every step, reg lazily):", "",
                "| setup | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for row in with_phases:
            shares = row["phase_fractions"]
            out.append(f"| {row['config']} | " + " | ".join(
                f"{100 * shares[n]:.0f}%" if n in shares else "-" for n in names) + " |")
    profiled = [r for r in rows if r.get("profile") and "top" in r["profile"]]
    if profiled:
        out += ["", "Where the time goes (one more cycle under torch.profiler):"]
        for row in profiled:
            out += [""] + profiling.markdown(row["config"], row["profile"])
    out += [f"- {row['config']}: no profile ({row['profile']['error']})" for row in rows
            if row.get("profile") and "error" in row["profile"]]
    notes = sorted({r["compile_note"] for r in rows if r.get("compile_note")})
    out += [""] + [f"- {note}" for note in notes]
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.chosen_device(args.device)
    outdir = common.output_dir(args.outdir, device)  # proven writable before measuring
    meta = common.run_metadata(device)
    data = "the built-in dataset through the real loader" if args.real_data else \
        "one fixed in-memory batch of real images (data loader not measured)"
    if device.type == "cuda":  # run_metadata's default, "CUDA events", is run.py's timer
        meta["timing"] = "wall clock over whole steps, GPU synchronised before and after"
    # What measure_setup really times: --quick takes a couple of steps, not whole cycles.
    if args.quick:
        warmup = 1 if args.warmup_steps is None else args.warmup_steps
        timed = (f"--quick: {args.cycles or 2} steps after {warmup} warm-up, not whole cycles "
                 "(the lazy regularisation phases are not in their true proportion)")
    else:
        timed = f"timed over {args.cycles or 2} whole 16-step cycles after warm-up"
    meta.update(cfg=args.cfg, what=(
        f"the real loop's Trainer.train_step, all phases with lazy regularisation, {timed}; "
        f"reals: {data}"))
    # The same first line as run.py's: on the CPU the figures are labelled not comparable.
    print(f"batikfast training step ({args.cfg}) on {meta['device']} ({meta['timing']}); "
          f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
          f"commit {meta['git_commit']}")
    rows = []
    if common.run_until_interrupted(lambda: run(args, device, rows), meta, rows,
                                    taken="the setups measured so far"):
        _add_speedups(rows)
    payload = dict(meta=meta, results=rows)
    written = common.write_report(outdir, "train_step", payload, markdown(payload))
    from benchmarks import plot
    try:
        note = plot.plot_train_step(payload, outdir / "train_step.png")
    except Exception as error:  # the data is saved; a chart can be redrawn with plot.py
        note = f"no PNG chart ({type(error).__name__}: {error})"
    print(f"{written}; {note}")
    return payload


if __name__ == "__main__":
    result = main()
    failed = [r for r in result["results"] if r.get("status", "").startswith("error")]
    # Non-zero when setups failed, so gpu_check.sh's summary shows it.
    sys.exit(1 if failed else 0)
