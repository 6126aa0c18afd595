"""Checkpoints: atomic writes, checksums, weights-only loading, RNG capture, choosing one to resume."""
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from batikfast.training import checkpoint as ckpt


def _state(value=1.0):
    return {"G": {"w": torch.full((3, 3), value)}, "progress": {"step": 4, "cur_nimg": 256},
            "config": {"cfg": "tiny", "lr": 0.0025, "betas": [0.0, 0.99], "none": None}}


def test_checkpoint_round_trips_weights_only_data(tmp_path):
    path = ckpt.save_checkpoint(_state(2.0), tmp_path / ckpt.checkpoint_name(4))
    assert path.name == "checkpoint-00000004.pt"
    loaded = ckpt.load_checkpoint(path)
    torch.testing.assert_close(loaded["G"]["w"], torch.full((3, 3), 2.0))
    assert loaded["config"] == _state()["config"] and loaded["progress"]["step"] == 4
    assert ckpt.verify_checkpoint(path) is None


def test_truncated_checkpoint_is_detected(tmp_path):
    path = ckpt.save_checkpoint(_state(), tmp_path / "checkpoint-00000001.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ckpt.CorruptCheckpointError, match="truncated"):
        ckpt.load_checkpoint(path)


def test_flipped_byte_is_detected_by_the_checksum(tmp_path):
    path = ckpt.save_checkpoint(_state(), tmp_path / "checkpoint-00000001.pt")
    data = bytearray(path.read_bytes())
    data[-50] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        ckpt.load_checkpoint(path)
    assert "checksum" in ckpt.verify_checkpoint(path)


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-00000001.pt"
    torch.save(_state(), path)  # a plain torch file: no header, no checksum
    with pytest.raises(ckpt.CorruptCheckpointError, match="not a batikfast checkpoint"):
        ckpt.load_checkpoint(path)


def test_loading_never_executes_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    import io
    import pickle
    buffer = io.BytesIO()
    torch.save({"evil": Payload()}, buffer, pickle_module=pickle)
    path = tmp_path / "checkpoint-00000001.pt"
    path.write_bytes(ckpt.MAGIC + f" sha256={__import__('hashlib').sha256(buffer.getvalue()).hexdigest()}"
                     f" size={len(buffer.getvalue())}\n".encode() + buffer.getvalue())
    with pytest.raises(ckpt.CorruptCheckpointError, match="weights only"):
        ckpt.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(_state(1.0), tmp_path / "checkpoint-00000001.pt")

    def failing_replace(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(ckpt.CheckpointError, match="previous checkpoint is kept"):
        ckpt.save_checkpoint(_state(5.0), path)
    monkeypatch.undo()
    torch.testing.assert_close(ckpt.load_checkpoint(path)["G"]["w"], torch.full((3, 3), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files by /proc")
def test_a_checkpoint_is_complete_on_disk_before_its_rename_and_the_rename_is_synced(
        tmp_path, monkeypatch):
    """Without the file's fsync, a power cut after the rename can leave a checkpoint of the
    final name with no data; without the folder's, the rename itself can be lost."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    path = ckpt.save_checkpoint(_state(), tmp_path / ckpt.checkpoint_name(1))
    [(_, tmp, final)] = [e for e in events if e[0] == "replace"]
    assert final == str(path) and Path(tmp).parent == tmp_path
    assert events == [("fsync", tmp), ("replace", tmp, final), ("fsync", str(tmp_path))]


def test_full_disk_is_reported_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(ckpt.CheckpointError, match="not enough disk space"):
        ckpt.save_checkpoint(_state(), tmp_path / "checkpoint-00000001.pt")
    assert not list(tmp_path.iterdir())


def test_resume_auto_picks_the_newest_valid_checkpoint(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(_state(float(step)), tmp_path / ckpt.checkpoint_name(step))
    newest = tmp_path / ckpt.checkpoint_name(3)
    newest.write_bytes(newest.read_bytes()[:200])  # killed mid-copy, say
    (tmp_path / ".checkpoint-00000004.pt.tmp-99999").write_bytes(b"partial")
    warnings = []
    found = ckpt.latest_valid_checkpoint(tmp_path, warn=warnings.append)
    assert found == tmp_path / ckpt.checkpoint_name(2)
    assert len(warnings) == 1 and "checkpoint-00000003.pt" in warnings[0]
    assert ckpt.latest_valid_checkpoint(tmp_path / "empty") is None


def test_prune_keeps_the_newest_and_removes_stale_temp_files(tmp_path):
    for step in (1, 2, 3, 10):
        ckpt.save_checkpoint(_state(), tmp_path / ckpt.checkpoint_name(step))
    (tmp_path / ".checkpoint-00000011.pt.tmp-99999").write_bytes(b"partial")
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000003.pt",
                                                          "checkpoint-00000010.pt"]


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = ckpt.capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    path = ckpt.save_checkpoint({"rng": state}, tmp_path / "checkpoint-00000001.pt")
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.restore_rng_state(ckpt.load_checkpoint(path)["rng"])
    torch.testing.assert_close(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_a_newer_file_format_is_named_as_such_not_as_a_foreign_file(tmp_path):
    path = ckpt.save_checkpoint(_state(), tmp_path / "checkpoint-00000001.pt")
    path.write_bytes(path.read_bytes().replace(b"BATIKFAST-CHECKPOINT 1", b"BATIKFAST-CHECKPOINT 2", 1))
    with pytest.raises(ckpt.UnsupportedCheckpointError, match="file format 2.*reads format 1"):
        ckpt.load_checkpoint(path)
    # --resume auto must not fall back to an older checkpoint past a newer run's one
    ckpt.save_checkpoint(_state(), tmp_path / "checkpoint-00000000.pt")
    with pytest.raises(ckpt.UnsupportedCheckpointError):
        ckpt.latest_valid_checkpoint(tmp_path)


def test_an_intact_file_without_a_training_state_or_of_a_newer_state_version_is_refused():
    with pytest.raises(ckpt.CorruptCheckpointError, match="not a training checkpoint.*missing "
                       "D, G_ema"):
        ckpt.check_training_state(_state(), "x.pt")
    full = {key: {} for key in ckpt.TRAINING_KEYS}
    full["progress"] = {"step": 1, "cur_nimg": 4, "tick": 1}
    assert ckpt.check_training_state(full, "x.pt") is full
    with pytest.raises(ckpt.UnsupportedCheckpointError, match="state version 2, newer"):
        ckpt.check_training_state(dict(full, format="batikfast-checkpoint", version=2), "x.pt")
    with pytest.raises(ckpt.CorruptCheckpointError, match="holds a list"):
        ckpt.check_training_state([1, 2], "x.pt")
