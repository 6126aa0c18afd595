"""Checkpoints that survive being killed at any moment, and that never execute code when loaded.

File layout: one header line, then the bytes of ``torch.save(state)``::

    BATIKFAST-CHECKPOINT 1 sha256=<64 hex> size=<payload bytes>\\n<payload>

Writing: the whole payload is serialised in memory first (so a failure to serialise leaves the
disk untouched), the free space is checked, then it goes to a temporary file in the same folder,
which is flushed, fsync'ed and renamed over the final name (``os.replace`` is atomic on POSIX and
Windows); the folder is fsync'ed so the rename itself survives a power cut. The previous
checkpoint stays until the new one is complete; older ones are pruned only afterwards.

Loading: the header's size and SHA-256 are checked before anything is unpickled, so a truncated
or corrupted file is reported as such (:class:`CorruptCheckpointError`), and the payload is read
with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

MAGIC = b"BATIKFAST-CHECKPOINT 1"
NAME_PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")
_HEADER_LIMIT = 256


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which file and why."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, damaged or not a batikfast checkpoint."""


class UnsupportedCheckpointError(CheckpointError):
    """An intact checkpoint of a newer file or state format than this batikfast reads."""


FORMAT_VERSION = 1  # the header's format number and the state's "version" this code reads
SPACE_MARGIN = 1 << 20  # free space a write leaves, so a checkpoint never fills the disk
TRAINING_KEYS = ("G", "D", "G_ema", "G_opt", "D_opt", "training", "scaler", "latent_gen", "rng",
                 "progress", "config")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def serialize(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    return MAGIC + f" sha256={digest} size={len(payload)}\n".encode() + payload


def atomic_write_bytes(path, data: bytes, space_margin: int = SPACE_MARGIN) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < len(data) + space_margin:
        raise CheckpointError(
            f"not enough disk space to write {path}: need {len(data) / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free in {folder}; the previous checkpoint is kept")
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise CheckpointError(f"could not write {path}: {error}; the previous checkpoint is kept") \
            from error
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(folder)
    return path


def save_checkpoint(state: dict, path) -> Path:
    """Serialise ``state`` (tensors, numbers, strings, lists, dicts) and write it atomically."""
    return atomic_write_bytes(path, serialize(state))


def _read_verified_payload(path: Path) -> bytes:
    return _verified_payload(read_checkpoint_file(path), path)


def read_checkpoint_file(path) -> bytes:
    """The file's bytes as written (header and payload), unverified."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error


def _verified_payload(data: bytes, path) -> bytes:
    newline = data.find(b"\n", 0, _HEADER_LIMIT)
    header = data[:newline] if newline >= 0 else b""
    match = re.fullmatch(re.escape(MAGIC) + rb" sha256=([0-9a-f]{64}) size=(\d+)", header)
    newer = re.match(rb"BATIKFAST-CHECKPOINT (\d+) ", header)
    if match is None and newer is not None and int(newer.group(1)) != FORMAT_VERSION:
        raise UnsupportedCheckpointError(
            f"{path} is a batikfast checkpoint of file format {int(newer.group(1))}, which this "
            f"batikfast cannot read (it reads format {FORMAT_VERSION}): use the batikfast "
            "version that wrote it")
    if match is None:
        raise CorruptCheckpointError(f"{path} is not a batikfast checkpoint (bad or missing header)")
    payload = data[newline + 1:]
    size = int(match.group(2))
    if len(payload) != size:
        raise CorruptCheckpointError(
            f"{path} is truncated or damaged: {len(payload)} of {size} payload bytes")
    if hashlib.sha256(payload).hexdigest() != match.group(1).decode():
        raise CorruptCheckpointError(f"{path} is corrupt: SHA-256 checksum mismatch")
    return payload


def load_checkpoint(path, map_location="cpu") -> dict:
    """Verify and load a checkpoint; never executes code from the file."""
    return load_checkpoint_bytes(read_checkpoint_file(path), path, map_location)


def load_checkpoint_bytes(data: bytes, path, map_location="cpu") -> dict:
    """:func:`load_checkpoint` of a file's bytes read elsewhere (``path`` names it in errors)."""
    payload = _verified_payload(data, path)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as error:
        raise CorruptCheckpointError(f"{path} passed its checksum but cannot be loaded "
                                     f"as weights only: {error}") from error


def check_training_state(state, path) -> dict:
    """``state`` if it is a training checkpoint this code can resume (written by train.py, of
    a state version it knows), else a CheckpointError naming ``path`` and what is wrong: an
    intact file of another kind or of a newer batikfast would otherwise fail deep inside the
    resume with a KeyError."""
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path} holds a {type(state).__name__}, not a training "
                                     "checkpoint")
    version = state.get("version")
    if state.get("format") == "batikfast-checkpoint" and isinstance(version, int) \
            and version > FORMAT_VERSION:
        raise UnsupportedCheckpointError(
            f"{path} is a training checkpoint of state version {version}, newer than this "
            f"batikfast reads ({FORMAT_VERSION}): use the batikfast version that wrote it")
    missing = [key for key in TRAINING_KEYS if key not in state]
    progress = state.get("progress")
    if not missing and not (isinstance(progress, dict) and
                            all(k in progress for k in ("step", "cur_nimg", "tick"))):
        missing = ["progress (step, cur_nimg, tick)"]
    if missing:
        raise CorruptCheckpointError(
            f"{path} is an intact file but not a training checkpoint written by train.py "
            f"(missing {', '.join(missing)}): it cannot be resumed")
    return state


def verify_checkpoint(path) -> str | None:
    """None when ``path`` is a complete, uncorrupted checkpoint; otherwise the reason."""
    try:
        _read_verified_payload(Path(path))
    except CheckpointError as error:
        return str(error)
    return None


def list_checkpoints(folder) -> list[Path]:
    """Checkpoints in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := NAME_PATTERN.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found, reverse=True)]


def _newest_readable(folder, warn, read):
    """(path, read(path)) of the newest checkpoint in ``folder`` that ``read`` accepts, or
    (None, None); the others are reported and skipped. One of a newer format than this code
    reads is an UnsupportedCheckpointError: resuming an older one instead would silently drop
    the newer run's progress."""
    for path in list_checkpoints(folder):
        try:
            return path, read(path)
        except UnsupportedCheckpointError:
            raise
        except CheckpointError as error:
            warn(f"skipping checkpoint: {error}")
    return None, None


def latest_valid_checkpoint(folder, warn=print) -> Path | None:
    """The newest checkpoint in ``folder`` that verifies."""
    return _newest_readable(folder, warn, _read_verified_payload)[0]


def latest_resumable_checkpoint(folder, warn=print) -> tuple[Path | None, bytes | None,
                                                             dict | None]:
    """(path, file bytes, state) of the newest intact training checkpoint in ``folder``
    (truncated, corrupt and foreign files skipped), or (None, None, None)."""
    def read(path):
        data = read_checkpoint_file(path)
        return data, check_training_state(load_checkpoint_bytes(data, path), path)

    path, found = _newest_readable(folder, warn, read)
    return (path, *found) if path is not None else (None, None, None)


def set_aside_checkpoints_after(folder, step: int) -> list[Path]:
    """Rename the checkpoints in ``folder`` beyond ``step`` to ``abandoned-checkpoint-*.pt``
    and return their new paths. A run that starts at ``step`` (from scratch, or resumed from an
    older checkpoint than the folder's newest: a roll-back after a divergence) would otherwise
    see each of its checkpoints pruned as soon as written (pruning keeps the highest steps),
    and ``--resume auto`` would continue the abandoned line instead of this one. Nothing is
    deleted: renaming one back makes it resumable again."""
    moved = []
    for path in list_checkpoints(folder):
        if int(NAME_PATTERN.match(path.name).group(1)) <= step:
            continue
        target = path.with_name(f"abandoned-{path.name}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"abandoned{n}-{path.name}")
        os.replace(path, target)
        moved.append(target)
    if moved:
        _fsync_dir(Path(folder))
    return moved


def prune_checkpoints(folder, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (call after a new one is complete)."""
    for path in list_checkpoints(folder)[max(keep, 1):]:
        try:
            path.unlink()
        except OSError:
            pass
    for stale in Path(folder).glob(".checkpoint-*.pt.tmp-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid():  # left by a killed run
            try:
                stale.unlink()
            except OSError:
                pass


# ---- RNG states as weights-only data ---------------------------------------------------------
def capture_rng_state() -> dict:
    """Every RNG the loop uses (torch CPU and CUDA, numpy's global, Python's), as plain data."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # this process's GPU only: touching the others would create a context on each of them
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and
        torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0].cpu())  # the current device's
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def load_generator(path, device="cpu", which: str = "G_ema"):
    """The generator of a checkpoint (``G_ema`` by default) and the run's config."""
    from batikfast.training.model import build_generator

    state = load_checkpoint(path)
    config = state.get("config", {})
    if "G_kwargs" not in config or which not in state:
        raise CheckpointError(f"{path} holds no {which} with its network arguments")
    G = build_generator(config["G_kwargs"])
    G.load_state_dict(state[which])
    return G.eval().requires_grad_(False).to(device), config
