"""Charts from saved benchmark JSON, drawn with Pillow (a batikfast dependency); no GPU, no torch.

    python benchmarks/plot.py benchmarks/results/<device>-<date>/ops.json   # -> ops.png, ops.md
    python benchmarks/plot.py .../train_step.json                          # -> train_step.png
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.textfmt import CPU_LABEL  # noqa: E402

FAST_IMPLS = ("ref+compile", "triton", "cuda")
COLORS = {"ref+compile": "#7f7f7f", "triton": "#1f77b4", "cuda": "#2ca02c"}
STEP_COLOR = "#1f77b4"
MAX_PANELS = 8

PAPER, INK, GRID = "white", "black", "#dddddd"
TITLE_SIZE, LABEL_SIZE, SMALL_SIZE = 15, 13, 11
MARGIN = 12
LEFT, RIGHT = 92, 24  # LEFT: the tick labels and the axis name
HEADER_H = 64  # title line, then the legend line
PANEL_TITLE_H = 24
PLOT_H = 220
CASE_W, CONFIG_W = 48, 64  # one case at full size: three bars of about 13 px and a gap
MIN_W, MAX_W = 900, 4000  # past MAX_W the cases get narrower, not the PNG wider
MIN_PLOT_W = 600  # a panel of few cases is this wide, not as wide as the widest panel
MAX_BAR_W = 24


class Box(NamedTuple):
    left: float
    top: float
    right: float
    bottom: float


@functools.lru_cache(maxsize=None)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or no FreeType: one small font
        return ImageFont.load_default()


_MEASURE = ImageDraw.Draw(Image.new("L", (1, 1)))


def _text_size(text: str, font) -> tuple[int, int]:
    """Width and height of text drawn at the origin, the space above its glyphs included."""
    try:
        _, _, right, bottom = _MEASURE.textbbox((0, 0), text, font=font)
    except ValueError:  # Pillow < 9.2 measures its bitmap font with getsize only
        return font.getsize(text)
    return right, bottom


def _vertical_text(image, text: str, font, centre_x: float, top: float):
    """Text reading upwards, its end at `top`: case names under the axis, the axis name."""
    width, height = _text_size(text, font)
    label = Image.new("L", (max(1, width), max(1, height)), 0)
    ImageDraw.Draw(label).text((0, 0), text, fill=255, font=font)
    mask = label.rotate(90, expand=True)  # a quarter turn is exact: no blur
    image.paste(INK, (round(centre_x - height / 2), round(top)), mask)


def _x_labels(image, names, box: Box):
    """Every name under its slot; every n-th one when the slots are thinner than a line."""
    font = _font(SMALL_SIZE)
    slot = (box.right - box.left) / len(names)
    every = max(1, math.ceil((_text_size("Ag", font)[1] + 2) / slot))
    for i in range(0, len(names), every):
        _vertical_text(image, names[i], font, box.left + (i + 0.5) * slot, box.bottom + 4)


def _labels_height(names) -> int:
    return max(_text_size(name, _font(SMALL_SIZE))[0] for name in names) + 12


def _y_axis(image, ticks, box: Box, name: str):
    """A grid line and a label at each (y, text), and the axis name, reading upwards."""
    draw, font = ImageDraw.Draw(image), _font(SMALL_SIZE)
    for y, text in ticks:
        draw.line([(box.left, y), (box.right, y)], fill=GRID)
        width, height = _text_size(text, font)
        draw.text((box.left - 6 - width, y - height / 2 - 1), text, fill=INK, font=font)
    name_w = _text_size(name, _font(LABEL_SIZE))[0]
    _vertical_text(image, name, _font(LABEL_SIZE), MARGIN + 8, (box.top + box.bottom - name_w) / 2)


def _legend(draw, impls, top: float, note: str):
    x, font = MARGIN, _font(LABEL_SIZE)
    for impl in impls:
        draw.rectangle([x, top + 2, x + 12, top + 14], fill=COLORS[impl])
        draw.text((x + 18, top), impl, fill=INK, font=font)
        x += 18 + _text_size(impl, font)[0] + 20
    draw.text((x + 10, top), note, fill=INK, font=font)


def _with_cpu_label(title: str, meta: dict) -> str:
    """A chart of CPU timings says they are not comparable, as the tables do."""
    return title if meta.get("device_type") == "cuda" else f"{title} - {CPU_LABEL}"


def _width(title: str, slots: int, slot_w: int, least: int) -> int:
    """Wide enough for the title and for the slots at full size, up to MAX_W."""
    wanted = min(MAX_W, LEFT + slots * slot_w + RIGHT)
    return max(least, wanted, _text_size(title, _font(TITLE_SIZE))[0] + 2 * MARGIN)


def _positive(value) -> bool:
    """A number a bar can show: finite and above zero (a log axis has no place for the rest)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def plot_ops(payload: dict, path: Path) -> str:
    """Speed-up over the eager reference per case, one panel per (shape set, batch, dtype, mode).

    Returns a sentence saying what was written or why nothing was.
    """
    panels = _panels(payload["results"])
    if not panels:
        return "no PNG chart: no successful measurements"
    shown = dict(list(panels.items())[:MAX_PANELS])
    meta = payload["meta"]
    title = _with_cpu_label(
        f"batikfast ops on {meta.get('device')} (torch {meta.get('torch')}, triton "
        f"{meta.get('triton')}, commit {str(meta.get('git_commit'))[:10]})", meta)
    most_cases = max(len({r["case"] for r in rows}) for rows in shown.values())
    width = _width(title, most_cases, CASE_W, MIN_W)
    heights = [_panel_height(rows) for rows in shown.values()]
    image = Image.new("RGB", (width, HEADER_H + sum(heights)), PAPER)
    _ops_header(image, title, shown)
    top = HEADER_H
    for (key, rows), height in zip(shown.items(), heights):
        _speedup_panel(image, key, rows, top, width)
        top += height
    image.save(path, format="PNG")
    extra = f" (first {MAX_PANELS} of {len(panels)} panels)" if len(panels) > MAX_PANELS else ""
    return f"wrote {path}{extra}"


def _panels(results) -> dict:
    panels = {}
    for row in results:
        if row.get("status") == "ok":
            key = (row["shape_set"], row["batch"], row["dtype"], row["mode"])
            panels.setdefault(key, []).append(row)
    return panels


def _bars(rows) -> dict:
    """(case, implementation) -> speed-up over eager, for the fast implementations that have one."""
    return {(r["case"], r["impl"]): r["speedup_vs_ref"] for r in rows
            if r["impl"] in FAST_IMPLS and _positive(r.get("speedup_vs_ref"))}


def _ops_header(image, title: str, panels: dict):
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=_font(TITLE_SIZE))
    drawn = {impl for rows in panels.values() for _, impl in _bars(rows)}
    _legend(draw, [impl for impl in FAST_IMPLS if impl in drawn], MARGIN + 28,
            "log scale; bars start at 1x: up = faster than the eager reference, down = slower")


def _panel_height(rows) -> int:
    return PANEL_TITLE_H + PLOT_H + _labels_height(r["case"] for r in rows) + 16


def _speedup_panel(image, key: tuple, rows: list, top: float, width: int):
    cases = list(dict.fromkeys(r["case"] for r in rows))
    bars = _bars(rows)
    draw = ImageDraw.Draw(image)
    draw.text((LEFT, top), "{} batch {} {} {}".format(*key), fill=INK, font=_font(LABEL_SIZE))
    right = min(width - RIGHT, LEFT + max(MIN_PLOT_W, len(cases) * CASE_W))
    box = Box(LEFT, top + PANEL_TITLE_H, right, top + PANEL_TITLE_H + PLOT_H)
    axis = _log_axis(bars.values(), box)
    ticks = [(axis.y(2.0 ** e), _ratio(e)) for e in range(axis.low, axis.high + 1, axis.step)]
    _y_axis(image, ticks, box, "speed-up over eager ref")
    _speedup_bars(draw, cases, bars, axis)
    draw.line([(box.left, axis.y(1.0)), (box.right, axis.y(1.0))], fill=INK, width=2)
    draw.rectangle(box, outline=INK)
    _x_labels(image, cases, box)


class LogAxis(NamedTuple):
    """Powers of two: 2**low at the bottom of `box`, 2**high at its top, a tick every `step`."""
    low: int
    high: int
    step: int
    box: Box

    def y(self, value: float) -> float:
        share = (math.log2(value) - self.low) / (self.high - self.low)
        return self.box.bottom - share * (self.box.bottom - self.box.top)


def _log_axis(values, box: Box, most_ticks: int = 8) -> LogAxis:
    """Covers the values and at least 0.5x..2x; ticks on multiples of `step`, so 1x is one."""
    low = min([-1, *(math.floor(math.log2(v)) for v in values)])
    high = max([1, *(math.ceil(math.log2(v)) for v in values)])
    step = max(1, math.ceil((high - low) / most_ticks))
    return LogAxis(step * math.floor(low / step), step * math.ceil(high / step), step, box)


def _ratio(exponent: int) -> str:
    """2**exponent as a speed-up label: 0.125x, 1x, 16x, 1/32x, 2^-20x."""
    if abs(exponent) > 16:  # past 65536x either way the digits outgrow the tick label's room
        return f"2^{exponent}x"
    if exponent < -3:
        return f"1/{2 ** -exponent}x"
    return f"{2.0 ** exponent:g}x"


def _speedup_bars(draw, cases: list, bars: dict, axis: LogAxis):
    """One group per case, each implementation at the same place in every group (a gap where
    it has no speed-up). Bars grow from 1x, not from the bottom edge: on a log axis that edge
    is an arbitrary ratio, so a bar's length from it would mean nothing."""
    impls = [impl for impl in FAST_IMPLS if any(i == impl for _, i in bars)]
    slot = (axis.box.right - axis.box.left) / len(cases)
    bar_w = min(MAX_BAR_W, 0.8 * slot / max(1, len(impls)))
    one = axis.y(1.0)
    for i, case in enumerate(cases):
        left = axis.box.left + (i + 0.5) * slot - bar_w * len(impls) / 2
        for k, impl in enumerate(impls):
            if (case, impl) in bars:
                top, bottom = sorted((axis.y(bars[case, impl]), one))
                if bottom - top < 4:  # about 1x: a sliver either side of the 1x line
                    top, bottom = one - 3, one + 3
                x = left + k * bar_w
                draw.rectangle([x, top, max(x, x + bar_w - 1), bottom], fill=COLORS[impl])


def plot_train_step(payload: dict, path: Path) -> str:
    """Images per second of each measured training-step configuration."""
    rows = [r for r in payload["results"]
            if r.get("status") == "ok" and _positive(r.get("images_per_s"))]
    if not rows:
        return "no PNG chart: no successful training-step measurement"
    title = _with_cpu_label(f"training step on {payload['meta'].get('device')}", payload["meta"])
    labels = [str(r["config"]) for r in rows]
    width = _width(title, len(rows), CONFIG_W, 480)
    box = Box(LEFT, MARGIN + 36, width - RIGHT, MARGIN + 36 + PLOT_H)
    image = Image.new("RGB", (width, int(box.bottom) + _labels_height(labels) + MARGIN), PAPER)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=_font(TITLE_SIZE))
    ticks = _linear_ticks(max(r["images_per_s"] for r in rows))
    scale = (box.bottom - box.top) / ticks[-1]
    _y_axis(image, [(box.bottom - t * scale, f"{t:g}") for t in ticks], box, "images / s")
    slot = (box.right - box.left) / len(rows)
    bar_w = min(48, 0.6 * slot)
    for i, row in enumerate(rows):
        x = box.left + (i + 0.5) * slot - bar_w / 2
        draw.rectangle([x, box.bottom - row["images_per_s"] * scale, max(x, x + bar_w - 1),
                        box.bottom], fill=STEP_COLOR)
    draw.rectangle(box, outline=INK)
    _x_labels(image, labels, box)
    image.save(path, format="PNG")
    return f"wrote {path}"


def _linear_ticks(highest: float, most: int = 6) -> list:
    """From 0 to at least `highest` in round steps (1, 2, 2.5 or 5 x 10^k)."""
    rough = highest / most
    power = 10.0 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= rough * (1 - 1e-9))
    return [step * i for i in range(math.ceil(highest / step - 1e-9) + 1)]


def kind_of(payload) -> str | None:
    """Which script wrote a results JSON: "ops", "train_step", "networks", "peer_nvidia",
    "peer_networks", or None for anything else (codegen.json, gpu_tests.json, a stray file)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("meta"), dict) \
            or not isinstance(payload.get("results"), list):
        return None
    rows = payload["results"]
    if "ceilings" in payload:
        return "ops"
    if payload["meta"].get("benchmark") == "peer_networks":  # also has nvidia_flavour
        return "peer_networks"
    if "nvidia_flavour" in payload["meta"]:
        return "peer_nvidia"
    if rows and all("network" in r for r in rows):
        return "networks"
    if all("config" in r for r in rows):
        return "train_step"
    return None


def main(argv=None) -> int:
    """Redraw each file; one that cannot be read or is not a benchmark result says so and the
    others are still drawn (a traceback used to stop the rest). Exit status 1 if any failed."""
    parser = argparse.ArgumentParser(description="Redraw charts (and ops.md) from results JSON.")
    parser.add_argument("json", nargs="+",
                        help="results JSON files: ops.json and train_step.json are drawn, "
                             "networks / peer_nvidia / peer_networks.json have tables only")
    args = parser.parse_args(argv)
    failed = 0
    for name in args.json:
        path = Path(name)
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            print(f"{path}: cannot read it as JSON ({type(error).__name__}: {error})",
                  file=sys.stderr)
            failed += 1
            continue
        kind = kind_of(payload)
        if kind == "ops":
            from benchmarks import report
            path.with_suffix(".md").write_text(report.markdown(payload))
            print(plot_ops(payload, path.with_suffix(".png")))
        elif kind == "train_step":
            print(plot_train_step(payload, path.with_suffix(".png")))
        elif kind == "peer_nvidia":
            print(f"{path}: no chart for the NVIDIA comparison; its table is peer_nvidia.md")
        elif kind == "peer_networks":
            print(f"{path}: no chart for the NVIDIA network comparison; its table is "
                  "peer_networks.md")
        elif kind == "networks":
            print(f"{path}: no chart for the whole-network timings; their table is networks.md")
        else:
            print(f"{path}: not a results file of the benchmark scripts (no meta / results, "
                  "or rows of no known kind); nothing drawn", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
