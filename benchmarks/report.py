"""Terminal and markdown tables for the op benchmarks (from rows, or from a saved JSON)."""
from __future__ import annotations

import statistics
from collections import OrderedDict, defaultdict

from benchmarks.textfmt import (CPU_LABEL, fixed_columns, fmt_float, fmt_ms_and_spread,
                                fmt_pct, fmt_speedup, fmt_spread, status_word)

IMPL_ORDER = ("ref", "ref+compile", "triton", "cuda")
_COLUMNS = (("case", 18), ("dtype", 5), ("mode", 8), ("impl", 11), ("ms", 8), ("p20-p80", 15),
            ("xeager", 6), ("xcomp", 6), ("GB/s", 8), ("TFLOP/s", 8), ("%roof", 5), ("err", 7))
_WIDTHS = [width for _, width in _COLUMNS]


def _err(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def print_header() -> None:
    line = fixed_columns([name for name, _ in _COLUMNS], _WIDTHS)
    print(line + " status")
    print("-" * len(line))


def print_row(row: dict) -> None:
    ok = row.get("status") == "ok"
    values = [
        row["case"], row["dtype"], row["mode"], row["impl"],
        fmt_float(row.get("ms")) if ok else "-",
        fmt_spread(row) if ok else "-",
        fmt_speedup(row.get("speedup_vs_ref")), fmt_speedup(row.get("speedup_vs_compiled")),
        fmt_float(row.get("gbps")) if ok else "-", fmt_float(row.get("tflops")),
        fmt_pct(row.get("frac_roofline")), _err(row.get("max_rel_err")),
    ]
    line = fixed_columns(values, _WIDTHS)
    status = "" if ok else row.get("status", "")
    print(f"{line} {status}".rstrip(), flush=True)


def ceilings_line(ceilings: dict, device) -> str:
    flops = ceilings["matmul_tflops"]
    label = "" if device.type == "cuda" else f" [{CPU_LABEL}]"
    return (f"measured ceilings{label}: copy {ceilings['copy_gbps']:.0f} GB/s; matmul TFLOP/s "
            + ", ".join(f"{k} {v:.1f}" for k, v in flops.items()))


def _group(rows, keys):
    groups = OrderedDict()
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def markdown(payload: dict) -> str:
    """The whole report: provenance, ceilings, per-layer tables, sums and bandwidth summary."""
    meta, ceilings, rows = payload["meta"], payload.get("ceilings"), payload["results"]
    out = [f"# batikfast op benchmarks: {meta['device']}", ""]
    if meta.get("device_type") != "cuda":
        out += [f"**{CPU_LABEL}**: CPU wall-clock timings (Triton interpreted), for checking "
                "that the script works; never compare them with GPU results.", ""]
    out += [
        f"- date {meta['date']}, commit `{meta.get('git_commit')}`"
        + (" (uncommitted changes)" if meta.get("git_dirty") else ""),
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
        f"cuDNN {meta.get('cudnn')}",
        f"- timing: {meta['timing']}; median of repeats with the 20th-80th percentile spread; "
        f"torch.compile: {meta.get('compile')}",
        "- fp32 convolutions: "
        + ("TF32 (torch's default)" if meta.get("tf32_cudnn", True) else
           "full fp32, TF32 off (as in training)"),
        "- activations (x, noise): "
        + ("channels-last (NHWC) memory" if meta.get("channels_last") else "NCHW (contiguous)"),
    ]
    if ceilings:
        flops = ceilings["matmul_tflops"]
        out.append(f"- measured ceilings: copy **{ceilings['copy_gbps']:.0f} GB/s**; matmul "
                   + ", ".join(f"{k} **{v:.1f}** TFLOP/s" for k, v in flops.items()))
    if meta.get("interrupted"):
        out.append("- **interrupted (Ctrl-C or a time limit): the run is incomplete**")
    if meta.get("skipped_for_budget"):
        out.append(f"- {meta['skipped_for_budget']} measurements skipped (time budget "
                   f"{meta.get('budget_s')} s)")
    out += ["", "Columns: median ms [20-80% spread]; speed-up over the eager reference "
            "(x eager) and the compiled reference (x comp); %roof = roofline bound "
            "max(minimal bytes / copy bandwidth, FLOPs / matmul peak) over the measured time; "
            "err = largest deviation from the eager reference relative to its largest value.", ""]
    out += _sum_tables(rows)
    out += _bandwidth_table(rows)
    for (shape_set, batch, dtype, mode), group in _group(
            rows, ("shape_set", "batch", "dtype", "mode")).items():
        out += [f"## {shape_set}, batch {batch}, {dtype}, {mode}", ""]
        out += _layer_table(group)
    notes = sorted({f"{r['impl']}: {r['status']}" for r in rows if r.get("status") != "ok"})
    if notes:
        out += ["## Not measured", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(out) + "\n"


def _layer_table(rows) -> list[str]:
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in rows)]
    header = ["case", "shape"] + [f"{i}" for i in impls]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (case,), group in _group(rows, ("case",)).items():
        by_impl = {r["impl"]: r for r in group}
        cells = [case, group[0]["shape"]]
        for impl in impls:
            cells.append(_cell(by_impl.get(impl)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _cell(row) -> str:
    if row is None:
        return "-"
    if row.get("status") != "ok":
        return status_word(row)
    parts = [fmt_ms_and_spread(row)]
    if row["impl"] != "ref" and row.get("speedup_vs_ref") is not None:
        parts.append(f"{row['speedup_vs_ref']:.2f}x eager")
    if row["impl"] not in ("ref", "ref+compile") and row.get("speedup_vs_compiled") is not None:
        parts.append(f"{row['speedup_vs_compiled']:.2f}x comp")
    if row.get("tflops"):
        parts.append(f"{fmt_float(row['tflops'])} TFLOP/s")
    elif row.get("gbps"):
        parts.append(f"{fmt_float(row['gbps'])} GB/s")
    if row.get("frac_roofline") is not None:
        parts.append(f"{fmt_pct(row['frac_roofline'])} roof")
    if row.get("max_rel_err") is not None and row["max_rel_err"] > 1e-2:
        parts.append(f"**err {row['max_rel_err']:.1e}**")
    return "<br>".join(parts)


def summed_times(rows) -> dict:
    """Per (shape set, batch, dtype, mode, op): the impl's summed median over the cases that
    every measured impl completed, so the sums compare like with like."""
    sums = OrderedDict()
    for key, group in _group(rows, ("shape_set", "batch", "dtype", "mode", "op")).items():
        per_case = defaultdict(dict)
        for row in group:
            if row.get("status") == "ok":
                per_case[row["case"]][row["impl"]] = row["ms"]
        impls = [i for i in IMPL_ORDER if any(i in v for v in per_case.values())]
        common_cases = [c for c, v in per_case.items() if all(i in v for i in impls)]
        if not common_cases:
            continue
        sums[key] = dict(cases=len(common_cases),
                         ms={i: sum(per_case[c][i] for c in common_cases) for i in impls})
    return sums


def _sum_tables(rows) -> list[str]:
    sums = summed_times(rows)
    if not sums:
        return []
    lines = ["## Summed over the layers of each shape set", "",
             "Sum of median ms over the cases every listed implementation completed; speed-ups "
             "are ratios of the sums (what a whole network pass sees, launch gaps aside).", "",
             "| shape set | batch | dtype | mode | op | cases | ref ms | ref+compile | triton "
             "| cuda |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (shape_set, batch, dtype, mode, op), entry in sums.items():
        ms = entry["ms"]
        ref = ms.get("ref")
        compiled = ms.get("ref+compile")
        cells = [shape_set, str(batch), dtype, mode, op, str(entry["cases"]),
                 fmt_float(ref) if ref else "-"]
        for impl in ("ref+compile", "triton", "cuda"):
            if impl not in ms:
                cells.append("-")
                continue
            text = f"{fmt_float(ms[impl])}"
            if ref:
                text += f" ({ref / ms[impl]:.2f}x eager"
                versus_compiled = compiled and impl != "ref+compile"
                text += f", {compiled / ms[impl]:.2f}x comp)" if versus_compiled else ")"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _bandwidth_table(rows) -> list[str]:
    """Memory-bound ops: the share of copy bandwidth each impl reaches (the 80% target)."""
    memory_bound = [r for r in rows if r.get("status") == "ok" and not r.get("flops")]
    if not memory_bound:
        return []
    lines = ["## Memory-bound ops: achieved share of measured copy bandwidth", "",
             "Over the cases moving at least 64 MiB (smaller ones are launch-bound): median and "
             "minimum of GB/s / copy GB/s.", "",
             "| op | dtype | mode | impl | cases | median | min |", "|---|---|---|---|---|---|---|"]
    for (op, dtype, mode, impl), group in sorted(
            _group(memory_bound, ("op", "dtype", "mode", "impl")).items(),
            key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], IMPL_ORDER.index(kv[0][3]))):
        fractions = sorted(r["frac_roofline"] for r in group
                           if r.get("frac_roofline") is not None and r["bytes"] >= 64 * 2**20)
        if not fractions:
            continue
        median = statistics.median(fractions)
        lines.append(f"| {op} | {dtype} | {mode} | {impl} | {len(fractions)} | "
                     f"{fmt_pct(median)} | {fmt_pct(fractions[0])} |")
    if len(lines) == 5:
        return []
    return lines + [""]
