"""Host time of the fast ops in eager mode: what batikfast's Python costs per call.

    python benchmarks/host_overhead.py          # any machine; on a GPU also the real kernels

Eager training is host-bound wherever kernels take less time than the Python that launches them
(the generator's 4..32 px layers, the mapping network). In eager mode batikfast calls a fast
op's implementation directly instead of through its registered torch.library op
(``batikfast.ops._autograd``); this times both roads, per call:

- ``stubbed``: every fast op at the tiny shapes with its kernels replaced by an allocation of
  their output, on whatever device: the row is batikfast's own host time (argument checks,
  backend choice, autograd, dispatch, and the torch ops around the kernels, which run for real:
  on the CPU their compute is tiny at these shapes), so it is measured on any machine;
- ``kernels`` (GPU only): every op's real Triton and CUDA kernels at the tiny benchmark shapes,
  host time per call: the wall clock of a round of calls before one synchronise (at that size
  the GPU keeps up, so the host sets the pace).

Each figure is the median over rounds of calls, with the 20th-80th percentile spread. Writes
``host_overhead.{json,md}`` beside the op results.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import types
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402  (sets TRITON_INTERPRET=1 without a GPU)
from benchmarks import opcases  # noqa: E402
from benchmarks.shapes import tiny_cases  # noqa: E402
from benchmarks.textfmt import fmt_float, fmt_speedup  # noqa: E402

import torch  # noqa: E402

from batikfast import backends  # noqa: E402
from batikfast.ops import _autograd  # noqa: E402

ROADS = ("dispatcher", "direct")
MODES = opcases.MODES
FAST_IMPLS = ("triton", "cuda")
# The ops that run as registered torch.library ops (conv2d_resample is composed of them).
FAST_OPS = ("bias_act", "upfirdn2d", "modulated_conv2d", "diffusion_noise")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=common.positive_int, default=30,
                        help="rounds of calls per figure (default 30)")
    parser.add_argument("--calls", type=common.positive_int, default=100,
                        help="calls per round (default 100)")
    parser.add_argument("--impls", nargs="+", choices=FAST_IMPLS, default=list(FAST_IMPLS),
                        help="the kernels section's implementations (default both)")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="fp32")
    parser.add_argument("--device", type=common.device_arg, default=None)
    parser.add_argument("--outdir", default=None)
    return parser.parse_args(argv)


def road(name: str):
    """The context in which eager calls take road ``name``."""
    return _autograd.through_the_dispatcher() if name == "dispatcher" else contextlib.nullcontext()


def _upfirdn2d_stub(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, *rest):
    fh, fw = f.shape
    out_h = (x.shape[2] * upy + pady0 + pady1 - fh) // downy + 1
    out_w = (x.shape[3] * upx + padx0 + padx1 - fw) // downx + 1
    return x.new_zeros([x.shape[0], x.shape[1], out_h, out_w])


def _modulated_conv2d_stub(x, weight, in_scale, out_scale, noise, bias, act, alpha, gain, clamp,
                           padding):
    out_h = x.shape[2] + 2 * padding - weight.shape[2] + 1
    out_w = x.shape[3] + 2 * padding - weight.shape[3] + 1
    return x.new_zeros([x.shape[0], weight.shape[0], out_h, out_w])


# The kernel-level API of every fast op, each function returning zeros of its output's shape.
STUB_KERNELS = types.SimpleNamespace(
    bias_act_forward=lambda x, *rest: torch.zeros_like(x),
    bias_act_backward=lambda dy, x, *rest: torch.zeros_like(x),
    upfirdn2d=_upfirdn2d_stub,
    modulated_conv2d_forward=_modulated_conv2d_stub,
    diffusion_noise_forward=lambda x, *rest: torch.zeros_like(x))


@contextlib.contextmanager
def stubbed_kernels():
    """Every fast op's kernels replaced by STUB_KERNELS, for every implementation."""
    original = backends.kernels
    backends.kernels = lambda op, impl: STUB_KERNELS
    try:
        yield
    finally:
        backends.kernels = original


def host_microseconds(fn, device: torch.device, rounds: int, calls: int) -> dict:
    """Host microseconds per call of ``fn``: median and 20th / 80th percentiles over rounds."""
    for _ in range(3):  # compiles a Triton specialisation, loads the extension, warms caches
        fn()
    common.synchronize(device)
    per_call_ms = []
    for _ in range(rounds):
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call_ms.append((time.perf_counter() - begin) / calls * 1000)
        common.synchronize(device)  # outside the clock: the GPU's own time is not host time
    timing = common.summarise_times(per_call_ms, "host wall clock")
    return dict(host_us=timing.median_ms * 1000, p20_us=timing.p20_ms * 1000,
                p80_us=timing.p80_ms * 1000, rounds=rounds, calls=calls)


def measure_case(section, case, impl, dtype, device, args, rows) -> None:
    for mode in MODES:
        inputs = opcases.make_inputs(case, 2, dtype, device, mode)
        for road_name in ROADS:
            row = dict(section=section, case=case.name, op=case.op, impl=impl, mode=mode,
                       road=road_name)
            with road(road_name):
                try:
                    fn = opcases.make_callable(case, inputs, impl, mode)
                    row.update(host_microseconds(fn, device, args.rounds, args.calls),
                               status="ok")
                except Exception as error:  # one failing case must not stop the rest
                    row.update(status="error", error=common.describe_error(error))
            rows.append(row)
            print(_line(row))


def run(args, device, dtype, rows) -> None:
    cases = [case for case in tiny_cases() if case.op in FAST_OPS]
    with stubbed_kernels():
        for case in cases:
            measure_case("stubbed", case, "triton", dtype, device, args, rows)
    if device.type != "cuda":
        print("kernels section skipped: it times real kernels, which need a GPU")
        return
    for case in cases:
        for impl in args.impls:
            reason = common.unavailable_reason(impl, device, dtype)
            if reason is not None:
                rows.append(dict(section="kernels", case=case.name, op=case.op, impl=impl,
                                 status="unavailable", error=reason))
                continue
            measure_case("kernels", case, impl, dtype, device, args, rows)


def _line(row: dict) -> str:
    where = f"{row['section']:8} {row['case']:18} {row['impl']:6} {row['mode']:8} {row['road']:10}"
    if row["status"] != "ok":
        return f"{where} {row['status']}: {row.get('error', '')}"
    return f"{where} {row['host_us']:8.1f} us/call [{row['p20_us']:.1f}-{row['p80_us']:.1f}]"


def paired(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(dispatcher row, direct row) of each case, implementation and mode both measured."""
    by_key = {}
    for row in rows:
        if row.get("status") == "ok":
            by_key.setdefault((row["section"], row["case"], row["impl"], row["mode"]),
                              {})[row["road"]] = row
    return [(pair["dispatcher"], pair["direct"]) for pair in by_key.values()
            if set(pair) == set(ROADS)]


def markdown(payload: dict) -> str:
    meta = payload["meta"]
    out = [
        "# batikfast: host time per eager call", "",
        f"- device: {meta['device']}; torch {meta['torch']}, Triton {meta['triton']}; "
        f"{meta['date']}; commit {meta['git_commit']}",
        f"- {meta['dtype']}, batch 2, tiny shapes; median of {meta['rounds']} rounds of "
        f"{meta['calls']} calls, wall clock per call (p20-p80)",
        "- dispatcher: an autograd.Function around the registered torch.library op (every eager "
        "call's road before 9ffd675); direct: the implementation called directly (the eager "
        "road since)",
        "- stubbed: each op's kernels replaced by an allocation of their output (batikfast's own "
        "host time with the torch ops around the kernels, measured on the CPU that runs the "
        "Python, GPU or not)"]
    if meta.get("interrupted"):
        out.append("- **interrupted (Ctrl-C or a time limit): the run is incomplete**")
    out.append("")
    out += ["| section | case | impl | mode | dispatcher us | direct us | saved us | speed-up |",
            "|---|---|---|---|---|---|---|---|"]
    for slow, fast in paired(payload["results"]):
        out.append(f"| {slow['section']} | {slow['case']} | {slow['impl']} | {slow['mode']} | "
                   f"{fmt_float(slow['host_us'])} | {fmt_float(fast['host_us'])} | "
                   f"{fmt_float(slow['host_us'] - fast['host_us'])} | "
                   f"{fmt_speedup(slow['host_us'] / fast['host_us'])} |")
    failed = [row for row in payload["results"] if row.get("status") != "ok"]
    for row in failed:
        out.append(f"- {row['case']} {row['impl']} {row.get('mode', '')}: {row['status']}: "
                   f"{row.get('error', '')}")
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.chosen_device(args.device)
    dtype = common.DTYPES[args.dtype]
    outdir = common.output_dir(args.outdir, device)  # proven writable before measuring
    meta = common.run_metadata(device)
    meta.update(dtype=args.dtype, rounds=args.rounds, calls=args.calls,
                timing="host wall clock per call")
    print(f"batikfast host time per eager call on {meta['device']}")
    rows = []
    common.run_until_interrupted(lambda: run(args, device, dtype, rows), meta, rows)
    payload = dict(meta=meta, results=rows)
    print(common.write_report(outdir, "host_overhead", payload, markdown(payload)))
    return payload


if __name__ == "__main__":
    main()
