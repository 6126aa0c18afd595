"""Charts from saved benchmark JSON; needs matplotlib, not a GPU.

    python benchmarks/plot.py benchmarks/results/<device>-<date>/ops.json   # -> ops.png, ops.md
    python benchmarks/plot.py .../train_step.json                          # -> train_step.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.textfmt import CPU_LABEL  # noqa: E402

FAST_IMPLS = ("ref+compile", "triton", "cuda")
COLORS = {"ref+compile": "#7f7f7f", "triton": "#1f77b4", "cuda": "#2ca02c"}
MAX_PANELS = 8


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ops(payload: dict, path: Path) -> str:
    """Speed-up over the eager reference per case, one panel per (shape set, batch, dtype, mode).

    Returns a sentence saying what was written or why nothing was.
    """
    plt = _pyplot()
    if plt is None:
        return "no PNG chart: matplotlib is not installed (pip install matplotlib; then " \
               f"python benchmarks/plot.py {path.with_suffix('.json')})"
    rows = [r for r in payload["results"] if r.get("status") == "ok"]
    panels = {}
    for row in rows:
        key = (row["shape_set"], row["batch"], row["dtype"], row["mode"])
        panels.setdefault(key, []).append(row)
    if not panels:
        return "no PNG chart: no successful measurements"
    keys = list(panels)[:MAX_PANELS]
    fig, axes = plt.subplots(len(keys), 1, figsize=(14, 3.4 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        _speedup_panel(ax, panels[key], key)
    meta = payload["meta"]
    title = f"batikfast ops on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, " \
            f"commit {str(meta.get('git_commit'))[:10]})"
    if meta.get("device_type") != "cuda":
        title += f" - {CPU_LABEL}"
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    extra = f" (first {MAX_PANELS} of {len(panels)} panels)" if len(panels) > MAX_PANELS else ""
    return f"wrote {path}{extra}"


def _speedup_panel(ax, rows, key):
    cases = list(dict.fromkeys(r["case"] for r in rows))
    width = 0.8 / len(FAST_IMPLS)
    for k, impl in enumerate(FAST_IMPLS):
        speedups = {r["case"]: r.get("speedup_vs_ref") for r in rows if r["impl"] == impl}
        xs = [i + (k - 1) * width for i, c in enumerate(cases) if speedups.get(c)]
        ys = [speedups[c] for c in cases if speedups.get(c)]
        if xs:
            ax.bar(xs, ys, width, label=impl, color=COLORS[impl])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")  # ratios: 0.5x and 2x sit equally far from 1x
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over eager ref")
    ax.set_title("{} batch {} {} {}".format(*key), fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def plot_train_step(payload: dict, path: Path) -> str:
    plt = _pyplot()
    if plt is None:
        return "no PNG chart: matplotlib is not installed"
    rows = [r for r in payload["results"] if r.get("status") == "ok"]
    if not rows:
        return "no PNG chart: no successful training-step measurement"
    labels = [r["config"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    ax.bar(range(len(rows)), [r["images_per_s"] for r in rows], color="#1f77b4")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title(f"training step on {payload['meta']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"wrote {path}"


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
