"""Where a measured setup spends its time: the top GPU kernels (or, on the CPU, operators) of
one extra profiled run, from ``torch.profiler``.

A headline figure says how fast; this says why: which kernels take the step's GPU time
(cuDNN's convolutions, batikfast's kernels, elementwise glue), and how many launches a step
makes (many small kernels point at launch overhead, which compilation or CUDA graphs remove).
The profiled run is not timed: the profiler adds overhead of its own.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.autograd import DeviceType

from benchmarks import common

NAME_CHARS = 90  # C++ template kernels have names of hundreds of characters


def profile_top(run, device: torch.device, steps: int, top: int = 12,
                trace_path: Path | None = None) -> dict:
    """Profile ``run()`` (``steps`` steps of work) and summarise its ``top`` events.

    Returns ``{"unit": "GPU kernel" | "CPU operator", "per_step": events per step,
    "ms_per_step": profiled time per step, "top": [{"name", "calls_per_step", "ms_per_step",
    "share"}, ...]}``; on a GPU the time is the kernels' own device time, on the CPU each
    operator's self time (children excluded, so nested operators are not counted twice).
    ``trace_path``: also write the Chrome / Perfetto trace there, gzipped.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    common.synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        run()
        common.synchronize(device)
    if trace_path is not None:
        _write_trace(profiler, trace_path)
    return summarise(profiler.key_averages(), device.type == "cuda", steps, top)


def summarise(averages, on_gpu: bool, steps: int, top: int) -> dict:
    """The events that own the time (GPU kernels, or CPU operators by self time), largest
    first, per step."""
    if on_gpu:
        events = [(e.key, e.count, e.self_device_time_total) for e in averages
                  if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        events = [(e.key, e.count, e.self_cpu_time_total) for e in averages
                  if e.self_cpu_time_total > 0]
    events.sort(key=lambda event: event[2], reverse=True)
    total_us = sum(us for _, _, us in events)
    return dict(
        unit="GPU kernel" if on_gpu else "CPU operator",
        per_step=sum(count for _, count, _ in events) / steps,
        ms_per_step=total_us / 1000 / steps,
        top=[dict(name=_short(name), calls_per_step=count / steps,
                  ms_per_step=us / 1000 / steps, share=us / total_us if total_us else 0.0)
             for name, count, us in events[:top]])


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 3] + "..."


def _write_trace(profiler, path: Path) -> None:
    """The trace gzipped (Perfetto and chrome://tracing open .json.gz): a training cycle's
    trace is tens of megabytes as text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        raw = os.path.join(scratch, "trace.json")
        profiler.export_chrome_trace(raw)
        with open(raw, "rb") as source, gzip.open(path, "wb") as target:
            shutil.copyfileobj(source, target)


def markdown(config: str, profile: dict) -> list[str]:
    """A table of one setup's top events."""
    unit = profile["unit"]
    lines = [f"{config}: {profile['per_step']:.0f} {unit}s a step, "
             f"{profile['ms_per_step']:.2f} ms of {'kernel' if unit == 'GPU kernel' else 'self'}"
             " time a step (profiled, not the timed run)", "",
             f"| {unit} | calls / step | ms / step | share |", "|---|---|---|---|"]
    for event in profile["top"]:
        name = event["name"].replace("|", "\\|")
        lines.append(f"| `{name}` | {event['calls_per_step']:.1f} | "
                     f"{event['ms_per_step']:.3f} | {100 * event['share']:.1f}% |")
    return lines
