"""Labels and number formatting shared by the tables; no torch, so reports redraw anywhere."""
from __future__ import annotations

import math

CPU_LABEL = "CPU (not comparable)"


def fmt_float(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if abs(value) < 0.01 else f"{value:.{digits - 1}f}"


def fmt_pct(value) -> str:
    """A fraction as a whole percentage; "-" when missing."""
    return "-" if value is None else f"{100 * value:.0f}%"


def fmt_speedup(value) -> str:
    """A ratio as "1.23x"; "-" when missing."""
    return "-" if value is None else f"{value:.2f}x"


def fmt_spread(row: dict) -> str:
    """A measured row's 20th-80th percentile milliseconds, as "0.81-0.85"."""
    return f"{fmt_float(row['ms_p20'])}-{fmt_float(row['ms_p80'])}"


def fmt_ms_and_spread(row: dict) -> str:
    """A measured row's median and spread, as "0.83 ms [0.81-0.85]"."""
    return f"{fmt_float(row['ms'])} ms [{fmt_spread(row)}]"


def status_word(row: dict) -> str:
    """A row that was not measured, in a table cell: its status up to the colon
    ("unavailable", "skipped", "error"); the reasons are listed below the tables."""
    return row.get("status", "-").split(":")[0]


def fixed_columns(values, widths) -> str:
    """One terminal table line: each value cut to its column's width and left-aligned."""
    return " ".join(f"{str(value)[:width]:<{width}}" for value, width in zip(values, widths))


def nvidia_comparison_cell(row: dict | None, with_spread: bool = False) -> str:
    """A batikfast or NVIDIA row of the peer reports as one markdown cell: median ms (and its
    spread), the speed-up over NVIDIA's path that ran, and the largest deviation from NVIDIA's
    result, in bold above 1e-2 with the tensor named where the row names it (the network
    comparison also gives the output's own deviation); "-" for no row."""
    if row is None:
        return "-"
    if row.get("status") != "ok":
        return status_word(row)
    text = fmt_ms_and_spread(row) if with_spread else f"{fmt_float(row['ms'])} ms"
    if row.get("speedup_vs_nvidia"):
        text += f"<br>{row['speedup_vs_nvidia']:.2f}x"
    err = row.get("max_rel_err_vs_nvidia")
    if err is None or math.isnan(err):
        return text
    if err <= 1e-2:
        text += f"<br>err {err:.0e}"
    else:
        text += f"<br>**err {err:.1e}**"
        if "worst_tensor" in row:
            text += f" ({row['worst_tensor']})"
    if "output_rel_err_vs_nvidia" in row:
        text += f"<br>output err {row['output_rel_err_vs_nvidia']:.0e}"
    return text
