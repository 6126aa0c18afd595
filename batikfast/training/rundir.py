"""The run directory: config JSON, log file, progress lines, TensorBoard scalars, image grids.

Only rank 0 writes. The folder is checked before training starts (it can be created, written,
and has room for a few checkpoints), so a typo or a full disk fails in the first second instead
of at the first snapshot hours later.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class OutputDirError(RuntimeError):
    """The output folder cannot be used; the message says why."""


def check_output_dir(outdir, need_bytes: int = 0, option: str = "--outdir") -> Path:
    """Create ``outdir`` if needed and prove it is writable and has ``need_bytes`` free; errors
    name it as the command-line ``option`` that gave it."""
    path = Path(outdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(f"{option} {str(path)!r} cannot be created: {error}") from error
    probe = path / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise OutputDirError(f"{option} {str(path)!r} is not writable: {error}") from error
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise OutputDirError(
            f"{option} {str(path)!r} has {free / 2**20:.0f} MiB free but checkpoints need about "
            f"{need_bytes / 2**20:.0f} MiB; free some space or choose another folder")
    return path


class RunLogger:
    """Writes progress lines to stdout and ``log.txt``; scalars to TensorBoard when installed."""

    def __init__(self, outdir, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.outdir = Path(outdir)
        if enabled:
            self.outdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8") if enabled else None
        self._jsonl = open(self.outdir / "stats.jsonl", "a", encoding="utf-8") if enabled else None
        self._failing: set = set()
        self._tb = self._open_tensorboard() if enabled and tensorboard else None

    @property
    def log_path(self) -> Path | None:
        """log.txt where this process writes it, else None."""
        return self.outdir / "log.txt" if self.enabled else None

    def _open_tensorboard(self):
        """TensorBoard's writer, or None: tensorboard is optional, and the log says once why
        its scalars are off (a user looking for them would otherwise find nothing, and no
        reason)."""
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(str(self.outdir))
        except Exception as error:  # absent, too old, a broken install (protobuf's, say)
            missing = isinstance(error, ModuleNotFoundError) and "tensorboard" in (error.name
                                                                                  or "")
            detail = (str(error).strip().splitlines() or [""])[0]
            reason = ("tensorboard is not installed" if missing else
                      f"tensorboard cannot be used ({type(error).__name__}: {detail})")
        self.print(f"TensorBoard scalars off: {reason}; stats.jsonl holds every scalar")
        return None

    def _write(self, handle, text: str) -> None:
        """Append ``text`` to ``handle``. A full disk (or a folder gone read-only) must not end
        a run that can still save its checkpoint later: the failure is said once on stderr,
        and the file's buffer is flushed again at the next write, which succeeds once the disk
        has room again."""
        try:
            handle.write(text)
            handle.flush()
        except OSError as error:
            if handle not in self._failing:
                self._failing.add(handle)
                print(f"warning: cannot write {handle.name} ({error}); training goes on (its "
                      "lines still go to stdout)", file=sys.stderr, flush=True)
        else:
            self._failing.discard(handle)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        print(message, flush=True)
        self._write(self._log, message + "\n")

    def scalars(self, values: dict, nimg: int) -> None:
        if not self.enabled:
            return
        self._write(self._jsonl,
                    json.dumps({"nimg": nimg, "timestamp": time.time(), **values}) + "\n")
        if self._tb is not None:
            try:
                for name, value in values.items():
                    self._tb.add_scalar(name, value, global_step=nimg)
                self._tb.flush()
            except OSError:  # TensorBoard is optional; stats.jsonl says the same
                pass

    def close(self) -> None:
        for handle in (self._log, self._jsonl):
            if handle is not None:
                try:
                    handle.close()
                except OSError:  # the disk is full: what was written stays
                    pass
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError:
                pass


def save_config(outdir, config: dict) -> Path:
    """``training_options.json``, replaced atomically: a run killed while writing it (each
    resume rewrites it) leaves the previous one, never a truncated file."""
    text = json.dumps(config, indent=2, sort_keys=True)
    return _write_atomically(Path(outdir) / "training_options.json",
                             lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def image_grid(images: np.ndarray | torch.Tensor, columns: int | None = None) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[rows*H, columns*W, C]`` (C 1 becomes grey)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    n, c, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = images[i].transpose(1, 2, 0)
    return grid


def save_image_grid(images, path, columns: int | None = None) -> Path:
    grid = image_grid(images, columns)
    image = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    return _write_atomically(path, lambda tmp: image.save(tmp, format="png"))


def copy_atomically(source, path) -> Path:
    """Copy a file so that ``path`` is never seen half-written."""
    return _write_atomically(path, lambda tmp: shutil.copyfile(source, tmp))


def _write_atomically(path, write) -> Path:
    """``write(tmp)`` into a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # a full disk: no half-written file left behind
            tmp.unlink()
    return path


def gpu_memory_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30


def progress_bar(fraction: float, width: int = 20) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + f"] {fraction * 100:5.1f}%"


def stderr_isatty() -> bool:
    return sys.stderr.isatty()
