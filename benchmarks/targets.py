"""The project's three performance targets, judged from a results folder's JSON.

    python benchmarks/targets.py benchmarks/results/<device>-<date>    # prints, writes targets.md

1. Memory-bound ops (bias_act, upfirdn2d, diffusion_noise) at >= 80% of the measured copy
   bandwidth, over the cases moving at least 64 MiB (``ops.json``).
2. The fused modulated convolution >= 1.5x the eager reference, summed over the paper256
   generator's layers (``ops.json``, shape set ``paper256-g``).
3. The whole training step >= 1.5x the eager reference and faster than the compiled reference
   (``train_step.json``).

Only GPU measurements are judged: timings taken on the CPU (interpreted Triton) say "CPU run,
not judged", and a file that is missing says "not measured". Reads only what the benchmark
scripts wrote, so it can be rerun on committed results at any time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/targets.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import summed_times  # noqa: E402
from benchmarks.textfmt import fmt_pct, fmt_speedup  # noqa: E402

MEMORY_BOUND_OPS = ("bias_act", "upfirdn2d", "diffusion_noise")
BANDWIDTH_SHARE = 0.80
LARGE_CASE_BYTES = 64 << 20  # smaller cases are launch-bound
MODCONV_SPEEDUP = 1.5
STEP_SPEEDUP = 1.5
FAST_IMPLS = ("triton", "cuda")


def _gpu_measured(payload: dict | None) -> str | None:
    """None if ``payload`` holds GPU timings, else why it cannot be judged."""
    if payload is None:
        return "not measured"
    if payload.get("meta", {}).get("device_type") != "cuda":
        return "CPU run, not judged"
    return None


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


def memory_bound(ops: dict | None) -> list[dict]:
    """Per (op, dtype, mode, fast impl): median and minimum share of copy bandwidth."""
    why_not = _gpu_measured(ops)
    if why_not:
        return [dict(op=op, verdict=why_not) for op in MEMORY_BOUND_OPS]
    groups: dict[tuple, list[float]] = {}
    for row in ops["results"]:
        if (row.get("op") in MEMORY_BOUND_OPS and row.get("impl") in FAST_IMPLS
                and row.get("status") == "ok" and row.get("bytes", 0) >= LARGE_CASE_BYTES
                and row.get("frac_roofline") is not None):
            key = (row["op"], row["dtype"], row["mode"], row["impl"])
            groups.setdefault(key, []).append(row["frac_roofline"])
    out = []
    for (op, dtype, mode, impl), shares in sorted(groups.items()):
        shares.sort()
        median = statistics.median(shares)
        out.append(dict(op=op, dtype=dtype, mode=mode, impl=impl, cases=len(shares),
                        median=median, minimum=shares[0],
                        verdict=_verdict(median >= BANDWIDTH_SHARE)))
    measured = {entry["op"] for entry in out}
    out += [dict(op=op, verdict="no case of 64 MiB or more measured")
            for op in MEMORY_BOUND_OPS if op not in measured]
    return out


def fused_modconv(ops: dict | None) -> list[dict]:
    """Per (batch, dtype, mode, fast impl): the summed generator layers against the reference."""
    why_not = _gpu_measured(ops)
    if why_not:
        return [dict(verdict=why_not)]
    out = []
    for (shape_set, batch, dtype, mode, op), entry in summed_times(ops["results"]).items():
        if shape_set != "paper256-g" or op != "modulated_conv2d" or "ref" not in entry["ms"]:
            continue
        ms = entry["ms"]
        for impl in FAST_IMPLS:
            if impl in ms:
                speedup = ms["ref"] / ms[impl]
                out.append(dict(batch=batch, dtype=dtype, mode=mode, impl=impl,
                                cases=entry["cases"], ref_ms=ms["ref"],
                                compiled_ms=ms.get("ref+compile"), ms=ms[impl],
                                speedup=speedup, verdict=_verdict(speedup >= MODCONV_SPEEDUP)))
    return out or [dict(verdict="no paper256-g modulated_conv2d case measured")]


def training_step(step: dict | None) -> list[dict]:
    """Per precision and fast setup: speed-up over the eager and the compiled reference."""
    why_not = _gpu_measured(step)
    if why_not:
        return [dict(verdict=why_not)]
    out = []
    for row in step["results"]:
        if row.get("status") != "ok" or row.get("backend") not in FAST_IMPLS:
            continue
        vs_eager, vs_compiled = row.get("speedup_vs_ref"), row.get("speedup_vs_compiled")
        if vs_eager is None or vs_compiled is None:
            verdict = "reference not measured in this run"
        else:
            verdict = _verdict(vs_eager >= STEP_SPEEDUP and vs_compiled > 1.0)
        out.append(dict(setup=row["config"], precision=row.get("precision"),
                        images_per_s=row.get("images_per_s"), vs_eager=vs_eager,
                        vs_compiled=vs_compiled, verdict=verdict))
    return out or [dict(verdict="no batikfast setup measured")]


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(ops: dict | None, step: dict | None) -> str:
    meta = (ops or step or {}).get("meta", {})
    lines = ["# Performance targets", "",
             f"Judged from the JSON in this folder by `benchmarks/targets.py`: device "
             f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, Triton "
             f"{meta.get('triton', '?')}, date {meta.get('date', '?')}, commit "
             f"`{meta.get('git_commit', '?')}`.", "",
             f"## 1. Memory-bound ops at >= {BANDWIDTH_SHARE:.0%} of copy bandwidth", "",
             "Cases moving at least 64 MiB; share = achieved GB/s / measured copy GB/s.", "",
             "| op | dtype | mode | impl | cases | median | min | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for e in memory_bound(ops):
        lines.append(f"| {e['op']} | {e.get('dtype', '-')} | {e.get('mode', '-')} | "
                     f"{e.get('impl', '-')} | {e.get('cases', '-')} | {fmt_pct(e.get('median'))} | "
                     f"{fmt_pct(e.get('minimum'))} | {e['verdict']} |")
    lines += ["", f"## 2. Fused modulated convolution >= {MODCONV_SPEEDUP}x the eager reference "
              "(paper256 generator layers, summed)", "",
              "| batch | dtype | mode | impl | layers | ref ms | ref compiled ms | impl ms | "
              "x eager | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in fused_modconv(ops):
        lines.append(f"| {e.get('batch', '-')} | {e.get('dtype', '-')} | {e.get('mode', '-')} | "
                     f"{e.get('impl', '-')} | {e.get('cases', '-')} | {_ms(e.get('ref_ms'))} | "
                     f"{_ms(e.get('compiled_ms'))} | {_ms(e.get('ms'))} | "
                     f"{fmt_speedup(e.get('speedup'))} | {e['verdict']} |")
    lines += ["", f"## 3. Training step >= {STEP_SPEEDUP}x the eager reference and faster than "
              "the compiled reference", "",
              "| setup | images/s | x eager ref | x compiled ref | verdict |",
              "|---|---|---|---|---|"]
    for e in training_step(step):
        images = e.get("images_per_s")
        lines.append(f"| {e.get('setup', '-')} | {'-' if images is None else f'{images:.1f}'} | "
                     f"{fmt_speedup(e.get('vs_eager'))} | {fmt_speedup(e.get('vs_compiled'))} | {e['verdict']} |")
    return "\n".join(lines) + "\n"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a results folder holding ops.json / train_step.json")
    parser.add_argument("--out", help="markdown file to write (default: <results>/targets.md)")
    args = parser.parse_args(argv)
    folder = Path(args.results)
    if not folder.is_dir():
        parser.error(f"{folder} is not a folder")
    text = markdown(_load(folder / "ops.json"), _load(folder / "train_step.json"))
    out = Path(args.out) if args.out else folder / "targets.md"
    out.write_text(text)
    print(text + f"\nwrote {out}")
    return text


if __name__ == "__main__":
    main()
