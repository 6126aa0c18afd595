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
