"""Time every batikfast op in every implementation at the paper256 shapes.

    python benchmarks/run.py                      # GPU: paper256 G and D, batch 64 and 16
    python benchmarks/run.py --quick              # tiny shapes: seconds on a GPU, ~1 min on a CPU
    python benchmarks/run.py --ops modulated_conv2d --dtype fp16 --batch 64 --budget 120
    python benchmarks/run.py --train-step         # also the whole training step

For each op, implementation (reference eager, reference under torch.compile, Triton, CUDA),
mode (forward, forward+backward), shape, batch and dtype it reports the median time with its
20-80% spread, the speed-up over the eager and the compiled reference, achieved GB/s
(minimal bytes) and TFLOP/s (convolutions), the fraction of the roofline built from the
device's own measured ceilings, and the largest deviation from the eager reference.
Results go to ``benchmarks/results/<device>-<date>/ops.{json,md,png}``; ``plot.py`` redraws
them from the JSON without a GPU. CPU timings are labelled "CPU (not comparable)".
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402  (sets TRITON_INTERPRET before triton loads)
from benchmarks.common import (DTYPES, Timer, describe_error, relative_error,  # noqa: E402
                               unavailable_reason)

import torch  # noqa: E402

from benchmarks import ceilings as ceilings_mod  # noqa: E402
from benchmarks import opcases, report, shapes  # noqa: E402

IMPLS = ("ref", "compiled", "triton", "cuda")
IMPL_LABELS = {"ref": "ref", "compiled": "ref+compile", "triton": "triton", "cuda": "cuda"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=sorted(opcases.OPS), default=None,
                        metavar="OP", help=f"ops to time, of {', '.join(sorted(opcases.OPS))} "
                                           "(default: all)")
    parser.add_argument("--cases", nargs="+", default=None, metavar="PATTERN",
                        help="only cases whose name matches one of these shell patterns, "
                             "e.g. 'G.b256.*' '*.conv0'")
    parser.add_argument("--backends", nargs="+", choices=IMPLS, default=list(IMPLS),
                        metavar="IMPL",
                        help="implementations: ref (eager), compiled (ref under torch.compile), "
                             "triton, cuda (default: all)")
    parser.add_argument("--shapes", nargs="+", choices=shapes.SHAPE_SETS, default=None,
                        metavar="SET", help=f"shape sets, of {', '.join(shapes.SHAPE_SETS)} "
                                            "(default: paper256-g paper256-d; --quick: tiny)")
    parser.add_argument("--batch", nargs="+", type=common.positive_int, default=None,
                        help="batch sizes, in order of priority under --budget "
                             "(default: 64 16; --quick: 2)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                        help="dtypes (default: fp16 fp32; --quick: fp32)")
    parser.add_argument("--modes", nargs="+", choices=opcases.ALL_MODES,
                        default=list(opcases.MODES),
                        help="fwd, fwd+bwd (default both) and fwd+bwd2: the double backward "
                             "of R1 / path-length regularisation (time only, no GB/s)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, few repeats, no torch.compile: checks the script works")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile reference")
    parser.add_argument("--compile", action="store_true",
                        help="time the compiled reference even with --quick")
    parser.add_argument("--compile-static", action="store_true",
                        help="compile one static-shape graph per shape (slower to compile) "
                             "instead of one dynamic-shape graph per op variant")
    parser.add_argument("--budget", type=common.positive_float, default=None,
                        help="seconds after which no new measurement starts (the rest is "
                             "recorded as skipped)")
    parser.add_argument("--rep-ms", type=common.positive_float, default=None,
                        help="milliseconds of timed repeats per measurement (default 100; "
                             "--quick: 20)")
    parser.add_argument("--outdir", default=None,
                        help="output folder (default benchmarks/results/<device>-<date>)")
    parser.add_argument("--device", type=common.device_arg, default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--train-step", action="store_true",
                        help="also run benchmarks/train_step.py (whole training step)")
    parser.add_argument("--no-ceilings", action="store_true",
                        help="skip measuring copy bandwidth and matmul throughput")
    parser.add_argument("--channels-last", action="store_true",
                        help="4-D activations (x, noise) in channels-last memory: shows what "
                             "each implementation's layout conversion costs (the Triton "
                             "modulated convolution reads channels-last, the others NCHW)")
    parser.add_argument("--no-tf32", action="store_true",
                        help="fp32 convolutions without TF32 (torch.backends.cudnn.allow_tf32 "
                             "off), as the training loop runs them; every backend follows it")
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = ["tiny"] if args.quick else ["paper256-g", "paper256-d"]
    if args.batch is None:
        args.batch = [2] if args.quick else [64, 16]
    if args.dtype is None:
        args.dtype = ["fp32"] if args.quick else ["fp16", "fp32"]
    if args.quick and not args.compile:
        args.no_compile = True
    if args.no_compile and "compiled" in args.backends:
        args.backends = [b for b in args.backends if b != "compiled"]
    if not any(selected(case, args) for shape_set in args.shapes
               for case in shapes.cases_for(shape_set)):
        # an empty run would still overwrite the results folder's ops.json
        parser.error(f"no case of the shape sets {args.shapes} matches --ops {args.ops} "
                     f"--cases {args.cases}")
    return args


def selected(case, args) -> bool:
    """Whether ``case`` is among the ops and name patterns asked for."""
    if args.ops is not None and case.op not in args.ops:
        return False
    return args.cases is None or any(fnmatch.fnmatchcase(case.name, pattern)
                                     for pattern in args.cases)


def _raise_compile_limits() -> None:
    # Every case compiles the same Python function: without this, dynamo stops recompiling
    # after 8 variants and silently runs the rest eagerly.
    config = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4096))


class Runner:
    """Walks shape sets x batches x dtypes x cases x modes x implementations."""

    def __init__(self, args, device: torch.device, timer: Timer, ceilings: dict | None):
        self.args = args
        self.device = device
        self.timer = timer
        self.ceilings = ceilings
        self.started = time.perf_counter()
        self.rows: list[dict] = []
        self.skipped = 0

    def over_budget(self) -> bool:
        return (self.args.budget is not None
                and time.perf_counter() - self.started > self.args.budget)

    def run(self) -> list[dict]:
        report.print_header()
        # Batch and dtype outermost: under --budget, the first batch and dtype given get
        # every shape set before the next batch or dtype starts.
        for batch in self.args.batch:
            for dtype_name in self.args.dtype:
                for shape_set in self.args.shapes:
                    for case in shapes.cases_for(shape_set):
                        if not selected(case, self.args):
                            continue
                        for mode in self.args.modes:
                            self.run_case(case, batch, dtype_name, mode)
        return self.rows

    def run_case(self, case, batch: int, dtype_name: str, mode: str) -> None:
        dtype = DTYPES[dtype_name]
        nbytes, flops = opcases.cost(case, batch, dtype, mode)
        base = dict(op=case.op, case=case.name, shape_set=case.shape_set, batch=batch,
                    dtype=dtype_name, mode=mode, shape=case.describe(batch), bytes=nbytes,
                    flops=flops)
        rows = []
        inputs = None
        reference_outputs = None
        try:
            for impl in self.args.backends:
                row = dict(base, impl=IMPL_LABELS[impl])
                rows.append(row)
                if self.over_budget():
                    row["status"] = "skipped: time budget"
                    self.skipped += 1
                    continue
                reason = unavailable_reason(impl, self.device, dtype)
                if reason is not None:
                    row["status"] = f"unavailable: {reason}"
                    continue
                try:
                    if inputs is None:
                        torch.manual_seed(0)
                        inputs = opcases.make_inputs(case, batch, dtype, self.device, mode,
                                                     channels_last=self.args.channels_last)
                    outputs = self.measure(row, case, inputs, impl, mode)
                except Exception as error:  # one broken kernel must not end the whole run
                    row["status"] = describe_error(error)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if impl == "ref":
                    reference_outputs = outputs
                elif opcases.OPS[case.op].deterministic:
                    row["max_rel_err"] = relative_error(outputs, reference_outputs)
        except KeyboardInterrupt:
            # The implementations this case already measured are kept (they were dropped with
            # the case: minutes of interpreted Triton, or a compile, lost to a time limit).
            for row in rows:
                if row.get("status") != "ok":
                    row["status"] = "interrupted"
            self.finish(rows)
            raise
        self.finish(rows)
        del inputs, reference_outputs
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def measure(self, row, case, inputs, impl, mode):
        kernel_impl = "ref" if impl == "compiled" else impl
        fn = opcases.make_callable(case, inputs, kernel_impl, mode,
                                   compiled=impl == "compiled",
                                   dynamic=not self.args.compile_static)
        begin = time.perf_counter()
        outputs = fn()
        common.synchronize(self.device)
        if impl == "compiled":
            row["compile_s"] = round(time.perf_counter() - begin, 2)
        timing = self.timer(fn)
        row.update(status="ok", ms=timing.median_ms, ms_p20=timing.p20_ms, ms_p80=timing.p80_ms,
                   repeats=timing.repeats)
        seconds = timing.median_ms * 1e-3
        row["gbps"] = row["bytes"] / seconds / 1e9 if row["bytes"] else None
        row["tflops"] = row["flops"] / seconds / 1e12 if row["flops"] else None
        row["frac_roofline"] = None if row["bytes"] is None else ceilings_mod.roofline_fraction(
            timing.median_ms, row["bytes"], row["flops"], self.ceilings, DTYPES[row["dtype"]])
        return outputs

    def finish(self, rows: list[dict]) -> None:
        by_impl = {row["impl"]: row for row in rows if row.get("status") == "ok"}
        eager, compiled = by_impl.get("ref"), by_impl.get("ref+compile")
        for row in rows:
            if row.get("status") == "ok":
                row["speedup_vs_ref"] = eager["ms"] / row["ms"] if eager else None
                row["speedup_vs_compiled"] = compiled["ms"] / row["ms"] if compiled else None
            report.print_row(row)
            self.rows.append(row)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.chosen_device(args.device)  # --device was checked by common.device_arg
    if "compiled" in args.backends:
        _raise_compile_limits()
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
    timer = common.script_timer(args, device, warmup_ms=common.repeat_ms(args) / 4)
    # Proven writable before the first measurement, not after the last one.
    outdir = common.output_dir(args.outdir, device)
    meta = common.run_metadata(device)
    meta.update(timing=timer.method, quick=args.quick,
                compile=("off" if "compiled" not in args.backends
                         else "static shapes" if args.compile_static else "dynamic shapes"),
                budget_s=args.budget, channels_last=args.channels_last)
    print(f"batikfast op benchmarks on {meta['device']} ({meta['timing']}); torch {meta['torch']}, "
          f"triton {meta['triton']}, CUDA {meta['cuda']}, commit {meta['git_commit']}")
    if device.type == "cpu" and "triton" in args.backends and set(args.shapes) != {"tiny"}:
        # Said before, not after: the first interpreted paper256 case alone runs for minutes
        # to hours, with no line printed until it ends.
        print("note: on the CPU Triton runs interpreted, minutes to hours per case at these "
              "shapes; --quick (tiny shapes) checks the script in about a minute, and no CPU "
              "figure is comparable with a GPU's", flush=True)
    ceilings = None
    if not args.no_ceilings:
        ceilings = ceilings_mod.measure_ceilings(device, timer)
        print(report.ceilings_line(ceilings, device))
    runner = Runner(args, device, timer, ceilings)
    try:
        rows = runner.run()
    except KeyboardInterrupt:  # gpu_check.sh's time limit sends SIGINT: keep what was measured
        rows = runner.rows
        meta["interrupted"] = True
        print("\ninterrupted: writing the measurements taken so far")
    meta["skipped_for_budget"] = runner.skipped
    meta["elapsed_s"] = round(time.perf_counter() - runner.started, 1)
    payload = dict(meta=meta, ceilings=ceilings, results=rows)
    written = common.write_report(outdir, "ops", payload, report.markdown(payload))
    from benchmarks import plot
    try:
        png_note = plot.plot_ops(payload, outdir / "ops.png")
    except Exception as error:  # the data is saved; a chart can be redrawn with plot.py
        png_note = f"no PNG chart ({type(error).__name__}: {error})"
    print(f"\n{written}; {png_note}")
    if runner.skipped:
        print(f"{runner.skipped} measurements skipped: --budget {args.budget} s reached")
    if args.train_step and meta.get("interrupted"):
        # Ctrl-C (or gpu_check.sh's time limit) means stop, not "go on to the next script".
        print("--train-step not run: the op benchmarks were interrupted")
    elif args.train_step:
        from benchmarks import train_step
        ts_argv = ["--outdir", str(outdir)] + (["--quick"] if args.quick else [])
        if args.device:
            ts_argv += ["--device", args.device]
        train_step.main(ts_argv)
    return payload


def exit_status(payload: dict) -> int:
    """130 after Ctrl-C or a time limit's SIGINT, as a shell reports an interrupted command."""
    return 130 if payload["meta"].get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(exit_status(main()))
