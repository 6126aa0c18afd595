"""The training loop on the CPU: every loss and augmentation, resume, faults, the command line.

Every run here is pinned to the CPU whether or not the machine has a GPU: ``device="cpu"`` and
``compile=False`` in :func:`micro_config`, ``--device cpu`` on every ``train.py`` and
``batikfast.generate`` command line (generate's default is the GPU when there is one). The
bit-exact comparisons (resume, deterministic runs, generate redrawing a training grid) hold on
the CPU only. The GPU test at the end says so in its name and skips without one.
"""
import copy
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batikfast.data import DatasetError
from batikfast.training import checkpoint as ckpt
from batikfast.training.config import make_config, split_batch
from batikfast.training.distributed import DistInfo
from batikfast.training.loop import Trainer, TrainingDiverged, train
from batikfast.training.rundir import OutputDirError
from tests._support import png_bytes

REPO = Path(__file__).resolve().parent.parent
BATCH = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def micro_config(steps: int = 4, **overrides) -> dict:
    """The smallest network that exercises every phase (16x16, a few channels)."""
    options = dict(resolution=16, z_dim=8, w_dim=8, channel_base=128, channel_max=8,
                   mbstd_group=2, batch=BATCH, batch_gpu=BATCH, kimg=steps * BATCH / 1000,
                   tick_kimg=BATCH / 1000, snap=100, image_snap=100, d_reg_interval=2,
                   g_reg_interval=4, workers=0, device="cpu", compile=False, grid_seeds=4,
                   data_size=64, ema_kimg=0.01, diffusion_kimg=0.05, ada_kimg=0.05)
    options.update(overrides)
    return make_config("tiny", **options)


def _weights(path):
    return ckpt.load_checkpoint(path)


@pytest.mark.parametrize("loss,aug,diffusion,cond", [
    ("stylegan2", "no", True, False), ("stylegan2", "ada", True, False),
    ("stylegan2", "diff", True, True), ("wgan", "no", True, False),
    ("wgan", "ada", False, False), ("stylegan2", "no", False, True)])
def test_each_loss_and_augmentation_trains_and_writes_outputs(tmp_path, loss, aug, diffusion,
                                                              cond):
    config = micro_config(steps=4, loss=loss, aug=aug, diffusion=diffusion, cond=cond,
                          adjust_interval=2, diffusion_target=-1.0, ada_target=-1.0)
    result = train(config, tmp_path)
    assert result["step"] == 4 and result["cur_nimg"] == 4 * BATCH
    state = _weights(result["checkpoint"])
    assert state["progress"]["step"] == 4
    initial = Trainer(micro_config(cond=cond), tmp_path / "fresh", DistInfo())
    assert initial.G.c_dim == (4 if cond else 0)
    for name, value in state["G"].items():
        assert torch.isfinite(value).all(), name
    changed = [n for n, v in state["D"].items() if not torch.equal(v, initial.D.state_dict()[n])]
    assert changed, "D did not train"
    for name in ("reals.png", "fakes_init.png", "fakes00000004.png", "log.txt",
                 "stats.jsonl", "training_options.json"):
        assert (tmp_path / name).exists(), name
    latest = (tmp_path / "fakes_latest.png").read_bytes()
    assert latest == (tmp_path / "fakes00000004.png").read_bytes(), "fakes_latest is not the newest"
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert "Loss/D/loss" in stats[0] and "Loss/G/loss" in stats[0]
    training = state["training"]
    if diffusion:
        # a target of -1 means "always overfitting": p and T must have grown at steps 2 and 4
        assert training["diffusion"]["p"] > 0 and training["diffusion"]["T"] >= 10
    if aug == "ada":
        assert training["augment_p"] > 0
    log = (tmp_path / "log.txt").read_text()
    assert "sec/kimg" in log and "torch.compile off" in log


def test_metrics_are_computed_at_checkpoints_on_the_given_feature_network(tmp_path):
    from batikfast.metrics import SmallFeatureNet
    SmallFeatureNet(channels=(4, 8), resolution=16).save(tmp_path / "features.pt")
    config = micro_config(steps=2, metrics=["fid", "kid", "pr"], metrics_num=8,
                          metrics_features=str(tmp_path / "features.pt"))
    train(config, tmp_path / "run")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "metrics fid" in log and "kid" in log and "precision" in log
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert any("Metrics/fid" in s and s["Metrics/fid"] >= 0 for s in stats)


def test_a_stop_saves_the_checkpoint_first_and_leaves_the_metrics_out(tmp_path, monkeypatch):
    """SIGTERM leaves torchrun's or a scheduler's grace period before SIGKILL: the metrics
    (minutes at 10k images) ran after the checkpoint and the grid before it."""
    from batikfast.metrics import SmallFeatureNet
    SmallFeatureNet(channels=(4, 8), resolution=16).save(tmp_path / "features.pt")
    config = micro_config(steps=4, metrics=["fid"], metrics_num=8,
                          metrics_features=str(tmp_path / "features.pt"))
    trainer = Trainer(config, tmp_path / "run", DistInfo())
    order = []
    for name in ("save_checkpoint", "save_grid", "evaluate_metrics"):
        method = getattr(trainer, name)
        monkeypatch.setattr(trainer, name, lambda *a, _m=method, _n=name, **k: (
            order.append(_n), _m(*a, **k))[1])
    train_step = trainer.train_step

    def step_then_sigterm(loader):
        train_step(loader)
        trainer.stop_signal = "SIGTERM"

    monkeypatch.setattr(trainer, "train_step", step_then_sigterm)
    trainer.run()
    assert order[-2:] == ["save_checkpoint", "save_grid"]
    assert "evaluate_metrics" not in order
    assert "metrics not evaluated on a stop" in (tmp_path / "run" / "log.txt").read_text()


def test_lazy_regularisation_corrects_adam_and_runs_phases_on_their_interval(tmp_path):
    trainer = Trainer(micro_config(g_reg_interval=4, d_reg_interval=16), tmp_path, DistInfo())
    phases = {p.name: p for p in trainer.phases}
    assert [p.name for p in trainer.phases] == ["Gmain", "Greg", "Dmain", "Dreg"]
    assert (phases["Greg"].interval, phases["Dreg"].interval) == (4, 16)
    g = phases["Gmain"].opt.param_groups[0]
    d = phases["Dmain"].opt.param_groups[0]
    assert g["lr"] == pytest.approx(0.0025 * 4 / 5) and d["lr"] == pytest.approx(0.0025 * 16 / 17)
    assert g["betas"][1] == pytest.approx(0.99 ** (4 / 5))
    assert d["betas"][1] == pytest.approx(0.99 ** (16 / 17))
    ran = []
    original = trainer.parts.accumulate_gradients
    trainer.parts.accumulate_gradients = lambda phase, **kw: (ran.append(phase), original(phase, **kw))
    from batikfast.data import make_loader
    loader = make_loader(trainer.dataset, trainer.batch_gpu, num_workers=0)
    for _ in range(2):
        trainer.train_step(loader)
    assert ran == ["Gmain", "Greg", "Dmain", "Dreg", "Gmain", "Dmain"]


def test_batch_splits_into_ranks_and_accumulation_rounds():
    config = micro_config(batch=16, batch_gpu=4, mbstd_group=4)
    assert split_batch(config, 1) == (4, 4)
    assert split_batch(config, 2) == (4, 2)
    assert split_batch(config, 4) == (4, 1)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        split_batch(config, 3)


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path):
    grads = {}
    for batch_gpu in (BATCH, BATCH // 2):
        # minibatch-std groups of 1: its groups would otherwise straddle the rounds differently
        config = micro_config(batch_gpu=batch_gpu, diffusion=False, style_mixing=0.0,
                              pl_weight=0.0, d_reg_interval=1, mbstd_group=1)
        trainer = _recording_trainer(config, tmp_path / str(batch_gpu))
        from batikfast.data import make_loader
        trainer.train_step(make_loader(trainer.dataset, trainer.batch_gpu, num_workers=0))
        grads[batch_gpu] = trainer.recorded
    for phase in ("Dmain", "Dreg"):
        for name, g in grads[BATCH][phase].items():
            torch.testing.assert_close(grads[BATCH // 2][phase][name], g, rtol=1e-4, atol=1e-6,
                                       msg=f"{phase} {name}")


def _recording_trainer(config, outdir, info=None):
    class Recording(Trainer):
        recorded = {}

        def _reduce_and_step(self, phase):
            ok = super()._reduce_and_step(phase)
            self.recorded[phase.name] = {n: p.grad.clone() for n, p in phase.module.named_parameters()
                                         if p.grad is not None and "noise_strength" not in n}
            return ok

    trainer = Recording(config, outdir, info or DistInfo())
    trainer.recorded = {}
    return trainer


def _same_state(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _same_state(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_stopped_and_resumed_run_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    options = dict(steps=6, aug="ada", adjust_interval=2, diffusion_target=-1.0, seed=5)
    whole = train(micro_config(**options), tmp_path / "whole")
    first = train(micro_config(stop_after_steps=3, **options), tmp_path / "split")
    assert first["step"] == 3
    second = train(micro_config(**options), tmp_path / "split", resume="auto")
    assert second["step"] == 6
    a, b = _weights(whole["checkpoint"]), _weights(second["checkpoint"])
    for key in ("G", "D", "G_ema", "G_opt", "D_opt", "training", "latent_gen", "progress"):
        _same_state(a[key], b[key], key)
    assert a["training"]["diffusion"]["p"] > 0  # the adaptive state really moved
    assert "resumed from" in (tmp_path / "split" / "log.txt").read_text()


def test_deterministic_runs_give_identical_checkpoints(tmp_path):
    a = train(micro_config(steps=2, deterministic=True), tmp_path / "a")
    b = train(micro_config(steps=2, deterministic=True), tmp_path / "b")
    _same_state(_weights(a["checkpoint"])["G"], _weights(b["checkpoint"])["G"])
    assert a["checkpoint"].read_bytes()[:100] == b["checkpoint"].read_bytes()[:100]


def _poisoned_trainer(config, outdir, poisoned_phase="Dmain"):
    """A trainer whose ``poisoned_phase`` leaves a NaN gradient while ``poison["on"]``."""
    trainer = Trainer(config, outdir, DistInfo())
    original = trainer.parts.accumulate_gradients
    poison = {"on": False}

    def poisoned(phase, **kwargs):
        original(phase, **kwargs)
        if poison["on"] and phase == poisoned_phase:
            next(trainer.D.parameters()).grad.fill_(float("nan"))

    trainer.parts.accumulate_gradients = poisoned
    from batikfast.data import make_loader
    return trainer, poison, make_loader(trainer.dataset, trainer.batch_gpu, num_workers=0)


def test_non_finite_gradients_skip_the_step_and_repeated_ones_stop_the_run(tmp_path):
    trainer, poison, loader = _poisoned_trainer(micro_config(steps=20, max_nan_skips=3, snap=1),
                                                tmp_path)
    trainer.train_step(loader)
    good = trainer.save_checkpoint()
    poison["on"] = True
    trainer.train_step(loader)
    for name, p in trainer.D.named_parameters():  # Dmain skipped (Dreg may still step)
        assert torch.isfinite(p).all(), name
    trainer.report_faults()  # what every adjust_interval-th step and every checkpoint do
    log = (tmp_path / "log.txt").read_text()
    assert "non-finite gradient in phase Dmain at step 1" in log
    with pytest.raises(TrainingDiverged, match="last good checkpoint is intact"):
        for _ in range(5):
            trainer.train_step(loader)
    assert ckpt.latest_valid_checkpoint(tmp_path) == good


def test_a_diverged_run_stops_at_the_next_tick_even_with_rare_adaptive_updates(tmp_path):
    # adjust_interval 1000: the skip flags are read at each tick (every step here) instead
    trainer, poison, _ = _poisoned_trainer(micro_config(steps=20, max_nan_skips=2,
                                                        adjust_interval=1000), tmp_path)
    poison["on"] = True
    with pytest.raises(TrainingDiverged, match="2 consecutive steps"):
        trainer.run()
    assert trainer.step == 2


def test_a_run_resumed_in_a_streak_of_non_finite_steps_counts_on_from_the_checkpoint(tmp_path):
    """The streak restarted at 0 on resume: a run stopped and resumed within a streak took
    max_nan_skips more bad steps to stop, and one that hit NaN around each checkpoint never
    stopped. A checkpoint of a run that did not save the streak resumes it as 0."""
    config = micro_config(steps=20, max_nan_skips=4)
    first, poison, loader = _poisoned_trainer(config, tmp_path / "first")
    first.train_step(loader)  # step 0 is good
    poison["on"] = True
    first.train_step(loader)
    first.train_step(loader)  # steps 1 and 2 skipped
    saved = first.save_checkpoint(final=True)  # what SIGTERM does
    state = ckpt.load_checkpoint(saved)
    assert state["progress"]["nan_streak"] == 2

    resumed, poison, _ = _poisoned_trainer(config, tmp_path / "resumed")
    resumed.load_state_dict(state, str(saved))
    assert resumed.nan_streak == 2
    poison["on"] = True
    with pytest.raises(TrainingDiverged, match="4 consecutive steps"):
        resumed.run()
    assert resumed.step == 5  # steps 3 and 4 were the streak's third and fourth

    del state["progress"]["nan_streak"]  # as written before the streak was saved
    older, _, _ = _poisoned_trainer(config, tmp_path / "older")
    older.load_state_dict(state, str(saved))
    assert older.nan_streak == 0 and older.step == 3


def test_ten_non_finite_steps_in_a_row_end_train_py_with_exit_3_and_finite_checkpoints(
        tmp_path, monkeypatch, capsys):
    """The README's promise at the command line: the default max_nan_skips, exit status 3,
    and checkpoints (pruned to the newest, written within the streak) that are all intact."""
    from batikfast.training import loop
    reduce_and_step = loop.Trainer._reduce_and_step

    def non_finite_from_step_2(self, phase):
        if self.step >= 2 and phase.name == "Dmain":
            next(self.D.parameters()).grad.fill_(float("inf"))
        return reduce_and_step(self, phase)

    monkeypatch.setattr(loop.Trainer, "_reduce_and_step", non_finite_from_step_2)
    run = tmp_path / "run"
    assert _train_cli().main(
        ["--outdir", str(run), "--cfg", "tiny", "--resolution", "16", "--batch", "4",
         "--batch-gpu", "4", "--workers", "0", "--device", "cpu", "--kimg", "0.1",
         "--tick", "0.004", "--snap", "1"]) == 3
    err = capsys.readouterr().err
    assert "error: 10 consecutive steps with non-finite gradients (last in phases Dmain at " \
           "step 11)" in err, err
    kept = ckpt.list_checkpoints(run)
    assert kept[0].name == ckpt.checkpoint_name(11) and str(kept[0]) in err
    for path in kept:
        state = ckpt.load_checkpoint(path)  # verified
        for net in ("G", "D", "G_ema"):
            assert all(torch.isfinite(v).all() for v in state[net].values()), (path, net)


def test_a_non_finite_forward_pass_leaves_no_nan_in_w_avg_or_the_path_length_mean(tmp_path):
    """Seen with a diverging run: the step was skipped, but the NaN that G's mapping wrote into
    its running w_avg stayed (in G_ema and in the 'last good checkpoint' too), and a NaN path
    length mean would make every later Greg non-finite."""
    trainer = Trainer(micro_config(steps=20), tmp_path, DistInfo())
    original = trainer.parts.accumulate_gradients

    def nan_latents(phase, **kwargs):  # a forward pass that overflows, as a diverging G does
        if phase in ("Gmain", "Greg"):
            kwargs["gen_z"] = torch.full_like(kwargs["gen_z"], float("nan"))
        original(phase, **kwargs)

    from batikfast.data import make_loader
    loader = make_loader(trainer.dataset, trainer.batch_gpu, num_workers=0)
    trainer.train_step(loader)  # a good step 0 (with Greg): w_avg and pl_mean move
    w_avg, pl_mean = trainer.G.mapping.w_avg.clone(), trainer.parts.reg_loss.pl_mean.clone()
    trainer.step = 4  # Greg's turn again
    trainer.parts.accumulate_gradients = nan_latents
    trainer.train_step(loader)
    trainer.report_faults()
    log = (tmp_path / "log.txt").read_text()
    assert "phase Gmain at step 4" in log and "phase Greg at step 4" in log
    assert torch.isfinite(trainer.G.mapping.w_avg).all()
    assert torch.isfinite(trainer.G_ema.mapping.w_avg).all()
    assert torch.isfinite(trainer.parts.reg_loss.pl_mean).all()
    torch.testing.assert_close(trainer.parts.reg_loss.pl_mean, pl_mean)
    assert not torch.equal(trainer.G.mapping.w_avg, w_avg)  # Dmain's finite pass still counts


def test_a_skipped_step_leaves_weights_and_adam_state_untouched_without_a_host_sync(tmp_path):
    # d_reg_interval 16: step 1 runs Dmain alone, so nothing else moves D
    trainer, poison, loader = _poisoned_trainer(micro_config(steps=20, d_reg_interval=16),
                                                tmp_path)
    trainer.train_step(loader)
    d_opt = trainer._opt("D")
    weights = {n: p.detach().clone() for n, p in trainer.D.named_parameters()}
    adam = copy.deepcopy(d_opt.state_dict()["state"])
    poison["on"] = True
    trainer.train_step(loader)
    for name, p in trainer.D.named_parameters():
        assert torch.equal(p, weights[name]), name
    _same_state(d_opt.state_dict()["state"], adam)
    # nothing was read back yet: the flag waits on the device for the next report
    assert not (tmp_path / "log.txt").exists() or \
        "non-finite" not in (tmp_path / "log.txt").read_text()
    assert [step for step, *_ in trainer._unreported_faults] == [0, 1]
    poison["on"] = False
    trainer.train_step(loader)
    assert any(not torch.equal(p, weights[n]) for n, p in trainer.D.named_parameters())
    trainer.report_faults()
    assert "non-finite gradient in phase Dmain at step 1" in (tmp_path / "log.txt").read_text()
    assert trainer.nan_streak == 0  # step 2 was good


def _train_main(argv):
    import importlib.util
    spec = importlib.util.spec_from_file_location("batikfast_train_cli", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_unwritable_output_folder_is_a_clear_error_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputDirError, match="cannot be created"):
        train(micro_config(), blocker / "run")
    assert _train_main(["--outdir", str(blocker / "run"), "--cfg", "tiny", "--kimg", "0.01",
                        "--device", "cpu"]) == 2
    assert "cannot be created" in capsys.readouterr().err


def test_full_disk_is_a_clear_error_before_training(tmp_path, monkeypatch):
    from batikfast.training import rundir
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(OutputDirError, match="MiB free"):
        train(micro_config(), tmp_path / "run")


def test_a_folder_with_room_for_one_checkpoint_but_not_two_is_refused_before_training(
        tmp_path, monkeypatch):
    """The size asked for left out the networks' buffers, each tensor's record in the file and
    the RNG states (micro networks: 120 kB asked, 267 kB written), and the free space the
    writer keeps: a folder that passed could not hold the second checkpoint."""
    from batikfast.training import rundir
    config = micro_config(steps=1)
    written = train(config, tmp_path / "sized")["checkpoint"].stat().st_size  # Adam's moments
    two = 2 * written + ckpt.SPACE_MARGIN  # the second is written beside the first

    def free_space(nbytes):
        monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: type("U", (), {"free": nbytes}))

    free_space(two - 1)
    with pytest.raises(OutputDirError, match="checkpoints need about"):
        Trainer(config, tmp_path / "run", DistInfo())
    free_space(int(two * 1.25))  # and not much more than that is asked for
    Trainer(config, tmp_path / "run", DistInfo())


def test_bad_data_path_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _train_main(["--outdir", str(tmp_path / "run"), "--cfg", "tiny", "--data",
                        str(tmp_path / "empty"), "--device", "cpu"]) == 2
    assert "no images found" in capsys.readouterr().err
    assert _train_main(["--outdir", str(tmp_path / "run"), "--cfg", "tiny", "--batch", "6",
                        "--batch-gpu", "4", "--device", "cpu"]) == 2
    assert "multiple of batch_gpu" in capsys.readouterr().err


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _cli(outdir, *extra):
    return [sys.executable, str(REPO / "train.py"), "--outdir", str(outdir), "--cfg", "tiny",
            "--resolution", "16", "--batch", "4", "--batch-gpu", "4", "--workers", "0",
            "--tick", "0.004", "--snap", "1", "--image-snap", "1000", "--device", "cpu", *extra]


def _wait_for(predicate, timeout, process):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{process.stdout.read()}")
        time.sleep(0.05)
    return False


def test_run_killed_with_sigkill_resumes_from_its_last_valid_checkpoint(tmp_path):
    outdir = tmp_path / "run"
    process = subprocess.Popen(_cli(outdir, "--kimg", "10"), env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_for(lambda: len(ckpt.list_checkpoints(outdir)) >= 2, 240, process)
        process.send_signal(signal.SIGKILL)  # possibly in the middle of a checkpoint write
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    newest = ckpt.latest_valid_checkpoint(outdir)
    assert newest is not None
    step = int(newest.name.split("-")[1].split(".")[0])
    # a damaged newest file must be passed over in favour of the one before it
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    resumed = subprocess.run(_cli(outdir, "--kimg", str((step + 2) * 4 / 1000), "--resume", "auto"),
                             env=_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "truncated" in resumed.stdout and "resumed from" in resumed.stdout
    final = ckpt.latest_valid_checkpoint(outdir)
    assert _weights(final)["progress"]["step"] == step + 2


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])  # a scheduler's, Ctrl-C's
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_0(tmp_path, stop):
    outdir = tmp_path / "run"
    process = subprocess.Popen(_cli(outdir, "--kimg", "10", "--snap", "1000"), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_for(lambda: "tick 1 " in (outdir / "log.txt").read_text()
                         if (outdir / "log.txt").exists() else False, 240, process)
        assert not ckpt.list_checkpoints(outdir)
        process.send_signal(stop)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert f"stopped by {stop.name}" in output
    assert ckpt.latest_valid_checkpoint(outdir) is not None


def test_the_stop_signal_handler_only_records_the_signal_and_writes_nothing():
    """A handler runs between any two bytecodes of the main thread, also inside the log file's
    write: logging from it raised "reentrant call inside BufferedWriter" once. The loop
    announces the stop after the step instead."""
    class Run:
        stop_signal = None

        def log(self, message):
            raise AssertionError(f"the signal handler logged {message!r}")

    run = Run()
    previous = Trainer._install_signal_handlers(run)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert run.stop_signal == "SIGTERM"


def test_a_repeated_stop_signal_is_the_same_request_unless_it_comes_later(monkeypatch):
    """Slurm's scancel signals every process of the job: each rank got SIGTERM from it and a
    moment later from torchrun, which passes its own on. The second was taken as 'stop now'
    (KeyboardInterrupt, no checkpoint: seen with 2 ranks and a 0.2 s gap)."""
    class Run:
        stop_signal = None
        SAME_STOP_REQUEST_S = getattr(Trainer, "SAME_STOP_REQUEST_S", 5.0)

        def log(self, message):
            raise AssertionError(f"the signal handler logged {message!r}")

    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    run = Run()
    previous = Trainer._install_signal_handlers(run)
    try:
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        clock[0] += 0.2
        try:  # a KeyboardInterrupt escaping a test would end the whole pytest session
            handler(signal.SIGTERM, None)  # torchrun's copy: no exception, still one stop
            handler(signal.SIGINT, None)
        except KeyboardInterrupt:
            pytest.fail("a repeat 0.2 s after the first stop signal was taken as 'stop now'")
        assert run.stop_signal == "SIGTERM"
        clock[0] += Run.SAME_STOP_REQUEST_S
        with pytest.raises(KeyboardInterrupt):  # asked again later: stop now
            handler(signal.SIGINT, None)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def test_tiny_cli_run_then_generate_a_grid(tmp_path):
    outdir = tmp_path / "demo"
    result = subprocess.run(_cli(outdir, "--kimg", "0.008"), env=_env(), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    checkpoint = ckpt.latest_valid_checkpoint(outdir)
    config = json.loads((outdir / "training_options.json").read_text())
    assert config["cfg"] == "tiny" and config["resolution"] == 16
    # --device cpu also turns the GPU default of torch.compile off
    assert config["device"] == "cpu" and config["compile"] is False
    log = (outdir / "log.txt").read_text()
    assert "on cpu" in log and "torch.compile off" in log
    grid = tmp_path / "grid.png"
    gen = subprocess.run([sys.executable, "-m", "batikfast.generate", "--ckpt", str(checkpoint),
                          "--seeds", "0-5", "--trunc", "0.7", "--out", str(grid),
                          "--device", "cpu"], env=_env(),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert gen.returncode == 0, gen.stderr
    from PIL import Image
    assert Image.open(grid).size == (3 * 16, 2 * 16)
    # the run's last grid shows seeds 0..15 of the EMA generator: generate redraws it exactly
    same = tmp_path / "same.png"
    # on the CPU, as the run drew it: a GPU's arithmetic would change some pixels
    gen = subprocess.run([sys.executable, "-m", "batikfast.generate", "--ckpt", str(checkpoint),
                          "--seeds", "0-15", "--out", str(same), "--device", "cpu"], env=_env(),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert gen.returncode == 0, gen.stderr
    step = _weights(checkpoint)["progress"]["step"]
    assert np.array_equal(np.asarray(Image.open(same)),
                          np.asarray(Image.open(outdir / f"fakes{step:08d}.png")))
    from batikfast.generate import generate_images
    from batikfast.training.checkpoint import load_generator
    G, _ = load_generator(checkpoint)
    a = generate_images(G, [3], truncation_psi=0.7)
    b = generate_images(G, [1, 2, 3], truncation_psi=0.7)[2:]
    assert torch.equal(a, b)  # a seed's image does not depend on the others


def test_generate_rejects_bad_seeds_and_missing_checkpoints(tmp_path):
    from batikfast.generate import main, parse_seeds
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    with pytest.raises(ValueError, match="empty"):
        parse_seeds("5-2")
    assert main(["--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "g.png")]) == 2


def test_command_line_options_reach_the_config(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("batikfast_train_cli", REPO / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.build_parser().parse_args(
        ["--outdir", "x", "--cfg", "paper256", "--loss", "wgan", "--aug", "ada", "--ts-dist",
         "uniform", "--no-diffusion", "--precision", "bf16", "--batch", "32", "--no-compile",
         "--kimg", "5", "--seed", "3", "--backend", "ref", "--deterministic",
         "--ddp-timeout", "90"])
    config = cli.config_from_args(args)
    assert config["ddp_timeout_s"] == 90
    with pytest.raises(ValueError, match="ddp-timeout"):
        cli.config_from_args(cli.build_parser().parse_args(["--outdir", "x", "--ddp-timeout",
                                                            "0"]))
    assert (config["loss"], config["aug"], config["ts_dist"], config["diffusion"]) == \
        ("wgan", "ada", "uniform", False)
    assert (config["precision"], config["batch"], config["batch_gpu"]) == ("bf16", 32, 16)
    assert (config["compile"], config["kimg"], config["seed"], config["deterministic"]) == \
        (False, 5, 3, True)
    # the paper's defaults
    paper = cli.config_from_args(cli.build_parser().parse_args(["--outdir", "x"]))
    assert (paper["resolution"], paper["batch"], paper["glr"], paper["r1_gamma"],
            paper["ema_kimg"], paper["channel_base"], paper["mbstd_group"]) == \
        (256, 64, 0.0025, 1.0, 20.0, 16384, 8)
    assert (paper["t_min"], paper["t_max"], paper["diffusion_target"], paper["noise_std"],
            paper["ts_dist"], paper["mirror"]) == (10, 1000, 0.6, 0.05, "priority", True)
    with pytest.raises(ValueError, match="metrics-features"):
        cli.config_from_args(cli.build_parser().parse_args(["--outdir", "x", "--metrics", "fid"]))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--outdir", "x", "--loss", "hinge"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_batch_that_does_not_split_over_torchruns_ranks_is_an_error_before_training(
        tmp_path, monkeypatch, capsys):
    cli = _train_cli()
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc-per-node=2 sets
    code = cli.main(["--outdir", str(tmp_path / "run"), "--cfg", "tiny", "--batch", "5"])
    assert code == 2
    assert "batch (5) must be a multiple of the number of processes (2)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_keeps_the_runs_own_run_time_options_unless_given_on_the_command_line(tmp_path):
    cli = _train_cli()
    run = tmp_path / "run"
    common = ["--outdir", str(run), "--resolution", "16", "--workers", "0", "--device", "cpu"]
    # batch 12 in rounds of 4: the tiny preset's batch_gpu (8) does not divide it
    assert cli.main([*common, "--cfg", "tiny", "--batch", "12", "--batch-gpu", "4",
                     "--kimg", "0.012", "--tick", "0.012", "--snap", "7"]) == 0
    # resumed as the README says, without --cfg: paper256's defaults are not this run's
    assert cli.main([*common, "--resume", "auto", "--kimg", "0.024"]) == 0
    options = json.loads((run / "training_options.json").read_text())
    assert (options["batch"], options["batch_gpu"]) == (12, 4)
    assert (options["tick_kimg"], options["snap"], options["kimg"]) == (0.012, 7, 0.024)
    assert _weights(ckpt.latest_valid_checkpoint(run))["progress"]["step"] == 2
    log = (run / "log.txt").read_text()
    assert "resumed from" in log and "keeping the checkpoint's" not in log


def _random_image_folder(path, count: int, size: int = 16):
    """A folder of ``count`` random RGB PNGs of ``size`` x ``size``."""
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            path / f"{i}.png")
    return path


def test_a_run_resumes_from_a_dataset_moved_since_when_given_its_new_data_path(tmp_path,
                                                                              capsys):
    """A dataset moved (or mounted elsewhere on the node that resumes): --data on the command
    line was ignored ("keeping the checkpoint's data") and the resume failed on the old path,
    with no way to continue the run."""
    cli = _train_cli()
    images = _random_image_folder(tmp_path / "images", count=8)
    run = tmp_path / "run"
    common = ["--outdir", str(run), "--cfg", "tiny", "--resolution", "16", "--batch", "4",
              "--batch-gpu", "4", "--workers", "0", "--device", "cpu", "--tick", "0.004"]
    assert cli.main([*common, "--data", str(images), "--kimg", "0.008"]) == 0
    moved = images.rename(tmp_path / "moved")
    assert cli.main([*common, "--resume", "auto", "--kimg", "0.016"]) == 2
    assert "does not exist" in capsys.readouterr().err  # the run's own path, now gone
    assert cli.main([*common, "--resume", "auto", "--kimg", "0.016", "--data", str(moved)]) == 0
    assert "reading the images from data=" in capsys.readouterr().out
    state = _weights(ckpt.latest_valid_checkpoint(run))
    assert state["progress"]["step"] == 4 and state["config"]["data"] == str(moved)


def test_resuming_on_another_number_of_processes_checks_the_checkpoints_batch(tmp_path,
                                                                            monkeypatch):
    from batikfast.training import loop
    from batikfast.training.config import ConfigError
    run = tmp_path / "run"
    train(micro_config(steps=1, batch=12, batch_gpu=4), run)
    cli = _train_cli()
    monkeypatch.setenv("WORLD_SIZE", "3")
    # the command line's batch (the preset's 8) is not the run's (12, which splits over 3)
    cli.config_from_args(cli.build_parser().parse_args(
        ["--outdir", str(run), "--cfg", "tiny", "--resume", "auto"]))
    # five ranks cannot share the run's batch: one clear error, not a traceback from inside
    # the trainer (the collectives of one rank stand in for five)
    monkeypatch.setattr(loop.dist_utils, "all_gather_objects", lambda obj, info, what="":
                        [obj] * info.world_size)
    monkeypatch.setattr(loop.dist_utils, "broadcast_object", lambda obj, *args: obj)
    with pytest.raises(ConfigError, match=r"cannot resume .*checkpoint-00000001.pt on 5 "
                       r"processes: batch \(12\) must be a multiple of the number of processes"):
        loop._train(micro_config(steps=2), run, "auto", DistInfo(world_size=5))


def test_resume_skips_or_refuses_intact_files_that_are_not_this_runs_training_state(tmp_path,
                                                                                    capsys):
    run = tmp_path / "run"
    good = train(micro_config(steps=1), run)["checkpoint"]
    state = ckpt.load_checkpoint(good)
    # an intact file of another kind under a checkpoint name: skipped by --resume auto
    ckpt.save_checkpoint({"G_ema": state["G_ema"]}, run / ckpt.checkpoint_name(7))
    assert train(micro_config(steps=2), run, resume="auto")["step"] == 2
    assert "checkpoint-00000007.pt is an intact file but not a training checkpoint" in \
        capsys.readouterr().out
    # named with --resume: one line and exit 2, not a KeyError traceback
    cli = ["--outdir", str(tmp_path / "other"), "--cfg", "tiny", "--resolution", "16",
           "--workers", "0", "--device", "cpu", "--resume"]
    foreign = run / f"abandoned-{ckpt.checkpoint_name(7)}"  # set aside by the resumed run
    assert _train_main([*cli, str(foreign)]) == 2
    assert "not a training checkpoint written by train.py" in capsys.readouterr().err
    # a newer batikfast's state, and weights that do not fit their own config
    newer = ckpt.save_checkpoint(dict(state, version=2, G_new=state["G"]), tmp_path / "new.pt")
    assert _train_main([*cli, str(newer)]) == 2
    assert "state version 2, newer than this batikfast reads" in capsys.readouterr().err
    config = dict(state["config"], channel_max=4)
    odd = ckpt.save_checkpoint(dict(state, config=config), tmp_path / "odd.pt")
    assert _train_main([*cli, str(odd)]) == 2
    assert "does not fit the networks of its own configuration" in capsys.readouterr().err


def test_a_run_rolled_back_to_an_older_checkpoint_keeps_its_own_checkpoints(tmp_path):
    """Resuming an older checkpoint in the same folder (a roll-back after a divergence, say):
    pruning keeps the highest steps, so every new checkpoint was deleted as soon as written
    while the log named it, and --resume auto went back to the abandoned line."""
    import shutil
    run = tmp_path / "run"
    train(micro_config(steps=1, snap=1), run)
    older = shutil.copy(ckpt.latest_valid_checkpoint(run), tmp_path / "step1.pt")
    train(micro_config(steps=6, snap=1), run, resume="auto")  # keeps steps 4, 5, 6
    result = train(micro_config(steps=2, snap=1), run, resume=str(older))
    assert result["checkpoint"].exists()
    assert ckpt.latest_valid_checkpoint(run) == result["checkpoint"]  # this run's step 2
    assert sorted(p.name for p in run.glob("abandoned-*")) == [
        f"abandoned-{ckpt.checkpoint_name(step)}" for step in (4, 5, 6)]
    assert "set aside 3 checkpoint(s) beyond step 1" in (run / "log.txt").read_text()


def test_a_fresh_start_in_a_used_folder_sets_the_earlier_runs_checkpoints_aside(tmp_path):
    """Its own checkpoints, at lower steps than the earlier run's, would be pruned as written,
    and --resume auto would continue the earlier run."""
    run = tmp_path / "run"
    train(micro_config(steps=3, snap=1), run)
    result = train(micro_config(steps=1, snap=1, seed=1), run)
    assert ckpt.latest_valid_checkpoint(run) == result["checkpoint"]
    assert _weights(result["checkpoint"])["config"]["seed"] == 1  # this run's
    assert sorted(p.name for p in run.glob("abandoned-*")) == [
        f"abandoned-{ckpt.checkpoint_name(step)}" for step in (1, 2, 3)]
    assert "set aside 3 checkpoint(s) beyond step 0" in (run / "log.txt").read_text()


def test_bad_metrics_options_stop_the_run_before_training_not_at_its_first_checkpoint(
        tmp_path, capsys):
    cli = _train_cli()
    common = ["--cfg", "tiny", "--resolution", "16", "--workers", "0", "--device", "cpu",
              "--kimg", "0.016"]
    features = tmp_path / "features.pt"
    assert cli.main(["--outdir", str(tmp_path / "a"), *common, "--metrics", "fid,is",
                     "--metrics-features", str(features)]) == 2
    assert "metrics must be among ('fid', 'kid', 'pr'), got ['is']" in capsys.readouterr().err
    assert cli.main(["--outdir", str(tmp_path / "b"), *common, "--metrics", "fid",
                     "--metrics-features", str(features)]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.save({"arch": "resnet"}, features)
    assert cli.main(["--outdir", str(tmp_path / "c"), *common, "--metrics", "fid",
                     "--metrics-features", str(features)]) == 2
    assert "expected 'batikfast.SmallFeatureNet'" in capsys.readouterr().err
    assert "tick 0" not in (tmp_path / "c" / "log.txt").read_text()
    assert not ckpt.list_checkpoints(tmp_path / "c")
    with pytest.raises(ValueError, match="metrics_num above 3"):
        micro_config(metrics=["pr"], metrics_num=3, metrics_features=str(features))


def test_metrics_num_sets_the_images_per_evaluation(tmp_path, capsys):
    """The default (10000 generated images) takes minutes per checkpoint on a CPU."""
    cli = _train_cli()
    common = ["--outdir", str(tmp_path / "run"), "--cfg", "tiny", "--metrics", "fid",
              "--metrics-features", str(tmp_path / "features.pt"), "--device", "cpu"]
    config = cli.config_from_args(cli.build_parser().parse_args([*common, "--metrics-num", "64"]))
    assert config["metrics_num"] == 64
    assert cli.main([*common, "--metrics-num", "1"]) == 2
    assert "error: metrics_num (--metrics-num) must be an integer of at least 2, got 1" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_dataset_too_small_for_the_metrics_is_an_error_before_training(tmp_path, capsys):
    """The metrics read min(metrics_num, dataset size) real images: a dataset of 3 images and
    precision/recall (k=3) trained until its first checkpoint, then ended with a traceback
    from the metrics. A dataset smaller than metrics_num (but large enough) is said at start."""
    from batikfast.metrics import SmallFeatureNet
    features = tmp_path / "features.pt"
    SmallFeatureNet(channels=(4, 8), resolution=16).save(features)
    images = _random_image_folder(tmp_path / "images", count=3)
    run = tmp_path / "run"
    assert _train_cli().main(
        ["--outdir", str(run), "--cfg", "tiny", "--resolution", "16", "--batch", "4",
         "--batch-gpu", "4", "--workers", "0", "--device", "cpu", "--kimg", "0.008",
         "--tick", "0.004", "--data", str(images), "--no-mirror", "--metrics", "fid,pr",
         "--metrics-features", str(features), "--metrics-num", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --metrics fid,pr cannot be evaluated on the 3 images of "
                          f"{str(images)!r}: precision/recall (k=3) needs more than 3 dataset "
                          "images, got 3") and "\n" not in err, err
    assert not ckpt.list_checkpoints(run) and "tick 0" not in (run / "log.txt").read_text()
    # x-flipped, the same folder holds 6 images: enough, and fewer than the 8 asked for
    Trainer(micro_config(data=str(images), mirror=True, metrics=["fid", "pr"], metrics_num=8,
                         metrics_features=str(features)), run, DistInfo())
    assert ("metrics: --metrics-num 8 but the dataset has 6 images (x-flips included); each "
            "evaluation uses all 6 and 8 generated images") in (run / "log.txt").read_text()


def test_init_starts_from_another_runs_weights_matched_by_name_and_shape(tmp_path):
    donor = train(micro_config(steps=1), tmp_path / "donor")["checkpoint"]
    donor_state = _weights(donor)
    trainer = Trainer(micro_config(init=str(donor)), tmp_path / "same", DistInfo())
    _same_state({k: v for k, v in trainer.G.state_dict().items()}, donor_state["G"])
    _same_state({k: v for k, v in trainer.G_ema.state_dict().items()}, donor_state["G_ema"])
    wider = Trainer(micro_config(init=str(donor), channel_max=16), tmp_path / "wider", DistInfo())
    log = (tmp_path / "wider" / "log.txt").read_text()
    assert "keep their initialisation" in log
    assert torch.equal(wider.G.state_dict()["mapping.fc0.weight"],
                       donor_state["G"]["mapping.fc0.weight"])


def test_a_run_started_with_init_resumes_without_its_init_file(tmp_path):
    """The checkpoint holds the weights: the --init file (a pretrained pickle moved or deleted
    since, or absent on another node) was read again on every resume, and its absence stopped
    the run."""
    donor = train(micro_config(steps=1), tmp_path / "donor")["checkpoint"]
    init = tmp_path / "pretrained.pt"
    donor.rename(init)
    run = tmp_path / "run"
    train(micro_config(steps=4, stop_after_steps=2, init=str(init)), run)
    init.unlink()
    result = train(micro_config(steps=4, init=str(init)), run, resume="auto")
    assert result["step"] == 4
    log = (run / "log.txt").read_text()
    assert log.count("init G from") == 1 and "resumed from" in log


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_training_goes_on(tmp_path,
                                                                             monkeypatch):
    trainer = Trainer(micro_config(steps=10), tmp_path, DistInfo())
    from batikfast.data import make_loader
    loader = make_loader(trainer.dataset, trainer.batch_gpu, num_workers=0)
    trainer.train_step(loader)
    good = trainer.save_checkpoint()
    trainer.train_step(loader)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("U", (), {"free": 100})())
    assert trainer.save_checkpoint() is None
    assert "checkpoint not written: not enough disk space" in (tmp_path / "log.txt").read_text()
    trainer.train_step(loader)  # still training
    with pytest.raises(ckpt.CheckpointError, match="not enough disk space"):
        trainer.save_checkpoint(final=True)
    monkeypatch.undo()
    assert ckpt.latest_valid_checkpoint(tmp_path) == good


class FakeSummaryWriter:
    """Stands in for TensorBoard's SummaryWriter (optional, maybe not installed): records the
    writers made (``made``, per install) and what each was given."""
    made: list = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        self.made.append(self)

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def fake_tensorboard_module():
    """A ``torch.utils.tensorboard`` whose SummaryWriter is a FakeSummaryWriter with its own
    list of writers made (``module.SummaryWriter.made``), to put in sys.modules."""
    import types
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = type("SummaryWriter", (FakeSummaryWriter,), {"made": []})
    return module


def _stats_lines(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def test_tensorboard_gets_each_ticks_scalars_of_stats_jsonl_and_is_closed_at_the_end(
        tmp_path, monkeypatch):
    tensorboard = fake_tensorboard_module()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    writers = tensorboard.SummaryWriter.made
    run = tmp_path / "run"
    train(micro_config(steps=3), run)  # a tick per step
    [writer] = writers
    assert writer.log_dir == str(run) and writer.closed
    stats = _stats_lines(run)
    assert [line["nimg"] for line in stats] == [BATCH, 2 * BATCH, 3 * BATCH]
    # each scalar as stats.jsonl has it, at the images seen so far
    assert writer.scalars == [(tag, value, line["nimg"]) for line in stats
                              for tag, value in line.items() if tag not in ("nimg", "timestamp")]
    assert {"Progress/kimg", "Timing/sec_per_kimg", "Timing/images_per_s",
            "Resources/gpu_mem_gib", "Loss/G/loss", "Loss/D/loss", "Diffusion/T",
            "Diffusion/p"} <= {tag for tag, _, step in writer.scalars if step == 3 * BATCH}
    assert "TensorBoard" not in (run / "log.txt").read_text()
    # a run refused at its setup closes its writer too
    with pytest.raises(ValueError, match="metrics_features"):
        train(micro_config(metrics=["fid"], metrics_features=str(tmp_path / "none.pt")),
              tmp_path / "refused")
    assert len(writers) == 2 and writers[1].closed


def test_without_tensorboard_a_run_trains_and_says_once_that_scalars_are_off(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    run = tmp_path / "run"
    assert train(micro_config(steps=2), run)["step"] == 2
    log = (run / "log.txt").read_text()
    assert log.count("TensorBoard scalars off: tensorboard is not installed") == 1, log
    assert [line["nimg"] for line in _stats_lines(run)] == [BATCH, 2 * BATCH]


def test_a_full_disk_under_the_log_stats_and_image_grids_does_not_end_the_run(
        tmp_path, monkeypatch, capsys):
    """Seen with a 70 MiB tmpfs filled mid-run: the checkpoint writes failed as designed, but
    the next flush of stats.jsonl raised ENOSPC out of the loop (exit 1, a traceback)."""
    import io
    from batikfast.training import rundir

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    class FullDiskFile(io.StringIO):
        def __init__(self, name):
            super().__init__()
            self.name = name
        flush = close = no_room

    real_init = rundir.RunLogger.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._log.close(), self._jsonl.close()
        self._log, self._jsonl = FullDiskFile("log.txt"), FullDiskFile("stats.jsonl")

    monkeypatch.setattr(rundir.RunLogger, "__init__", init)
    monkeypatch.setattr(rundir.Image.Image, "save", no_room)  # every grid, reals.png included
    result = train(micro_config(steps=3, image_snap=1, snap=1), tmp_path / "run")
    assert result["step"] == 3 and ckpt.verify_checkpoint(result["checkpoint"]) is None
    out, err = capsys.readouterr()
    assert err.count("warning: cannot write log.txt") == 1  # once, not at every line
    assert err.count("warning: cannot write stats.jsonl") == 1
    assert "image grid reals.png not written" in out and "image grid fakes00000003.png not " \
        "written" in out
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_the_options_file_is_replaced_atomically_and_a_failed_write_does_not_stop_the_run(
        tmp_path, monkeypatch):
    """Each resume rewrites training_options.json: written in place, a kill or a full disk
    in the middle left it truncated, and the OSError ended the run with a traceback."""
    from batikfast.training import rundir
    run = tmp_path / "run"
    train(micro_config(steps=1), run)
    before = (run / "training_options.json").read_text()
    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith("training_options.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", full_disk)
    with pytest.raises(OSError):
        rundir.save_config(run, {"kimg": 2})
    assert (run / "training_options.json").read_text() == before
    assert [p.name for p in run.iterdir() if "training_options" in p.name] == [
        "training_options.json"]
    assert train(micro_config(steps=2), run, resume="auto")["step"] == 2
    assert "training_options.json not written" in (run / "log.txt").read_text()


def test_backend_option_selects_the_op_implementation(tmp_path):
    import batikfast
    try:
        Trainer(micro_config(backend="ref"), tmp_path, DistInfo())
        assert batikfast.get_backend() == "ref"
        Trainer(micro_config(backend="auto"), tmp_path, DistInfo())
        assert batikfast.get_backend() in (None, os.environ.get("BATIKFAST_BACKEND"))
    finally:
        batikfast.set_backend(None)


def test_a_backend_that_cannot_run_on_the_device_is_a_one_line_error_before_the_run_folder(
        tmp_path, monkeypatch, capsys):
    """It was a traceback from the first image grid, after the run folder was made."""
    cli = _train_cli()
    monkeypatch.delenv("BATIKFAST_BACKEND", raising=False)
    outdir = tmp_path / "run"
    assert cli.main(["--outdir", str(outdir), "--backend", "cuda", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --backend cuda cannot run on cpu: ") and "\n" not in err
    monkeypatch.setenv("BATIKFAST_BACKEND", "cuda")  # forced by the environment under auto
    assert cli.main(["--outdir", str(outdir), "--device", "cpu"]) == 2
    assert "error: BATIKFAST_BACKEND=cuda cannot run on cpu" in capsys.readouterr().err
    monkeypatch.setenv("BATIKFAST_BACKEND", "fast")
    assert cli.main(["--outdir", str(outdir), "--device", "cpu"]) == 2
    assert "error: BATIKFAST_BACKEND must be one of" in capsys.readouterr().err
    assert not outdir.exists()


def test_the_log_names_the_backend_in_force_and_where_it_came_from(tmp_path, monkeypatch):
    import batikfast
    monkeypatch.setenv("BATIKFAST_BACKEND", "ref")
    try:
        trainer = Trainer(micro_config(backend="auto"), tmp_path, DistInfo())
        assert trainer._backend_in_force() == "ref (BATIKFAST_BACKEND; --backend auto)"
        monkeypatch.delenv("BATIKFAST_BACKEND")
        assert trainer._backend_in_force().startswith("auto (")
        trainer = Trainer(micro_config(backend="ref"), tmp_path, DistInfo())
        assert trainer._backend_in_force() == "ref (--backend)"
    finally:
        batikfast.set_backend(None)


def test_ema_has_the_requested_half_life_and_ramp_up():
    from batikfast.training.ema import ema_beta, update_ema
    beta = ema_beta(batch=64, cur_nimg=10**6, ema_kimg=20, ema_rampup=None)
    assert beta ** (20000 / 64) == pytest.approx(0.5)
    # ramp-up: the half-life is at most rampup * images seen so far
    assert ema_beta(64, 1000, 20, 0.05) == pytest.approx(0.5 ** (64 / 50))
    G, G_ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        G.weight.fill_(3.0)
        G_ema.weight.fill_(1.0)
        G.running_mean.fill_(7.0)
    update_ema(G_ema, G, beta=0.25)
    torch.testing.assert_close(G_ema.weight, torch.full((3,), 0.25 * 1.0 + 0.75 * 3.0))
    torch.testing.assert_close(G_ema.running_mean, torch.full((3,), 7.0))  # buffers copied


def test_fp16_loss_scaling_unscales_to_the_same_gradients_and_backs_off_on_overflow(tmp_path):
    from batikfast.data import make_loader
    from batikfast.training.loop import LossScaler
    grads = []
    for scale in (None, 1024.0):
        config = micro_config(diffusion=False, style_mixing=0.0, pl_weight=0.0, seed=1)
        trainer = _recording_trainer(config, tmp_path / str(scale))
        if scale:
            trainer.scaler = LossScaler(True, init_scale=scale)
        trainer.train_step(make_loader(trainer.dataset, trainer.batch_gpu, num_workers=0))
        grads.append(trainer.recorded)
    for phase in ("Gmain", "Dmain", "Dreg"):
        for name, g in grads[0][phase].items():
            torch.testing.assert_close(grads[1][phase][name], g, rtol=1e-5, atol=1e-8)
    scaler = LossScaler(True, init_scale=8.0, growth_interval=2)
    overflow, fine = torch.ones(()), torch.zeros(())
    assert scaler.update(overflow).item() == 0.0  # backing off cures an fp16 overflow
    assert scaler.scale.item() == 4.0
    scaler.update(fine)
    scaler.update(fine)
    assert scaler.scale.item() == 8.0
    grads = [torch.tensor([8.0, 16.0]), torch.tensor([float("inf")])]
    assert scaler.unscale_and_check_(grads).item() == 1.0
    assert grads[0].tolist() == [1.0, 2.0]
    tiny = LossScaler(True, init_scale=1.0)
    assert tiny.update(overflow).item() == 1.0  # below a scale of 1, an overflow is a fault
    restored = LossScaler(True)
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()


def test_training_on_a_zip_made_by_the_dataset_tool(tmp_path):
    from PIL import Image
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from make_dataset import make_dataset
    finally:
        sys.path.pop(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    make_dataset(photos, tmp_path / "batik.zip", resolution=16, log=lambda m: None)
    result = train(micro_config(steps=2, data=str(tmp_path / "batik.zip")), tmp_path / "run")
    assert result["step"] == 2
    options = json.loads((tmp_path / "run" / "training_options.json").read_text())
    assert options["data"].endswith("batik.zip")


def test_an_archive_of_smaller_images_than_the_run_is_refused_and_a_larger_one_logged(tmp_path):
    """Training a 16x16 archive at 32x32 (a 128 archive under the default paper256, say) would
    upscale every image: an error naming the --resolution that fits. Larger images are
    downscaled, and the log says so."""
    archive = tmp_path / "d16.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(4):
            z.writestr(f"{i}.png", png_bytes(Image.new("RGB", (16, 16), (i * 60, 0, 0))))
    with pytest.raises(DatasetError, match=r"are 16x16 but the run trains at 32x32 .*upscale "
                                           r"every image: pass --resolution 16"):
        Trainer(micro_config(data=str(archive), resolution=32), tmp_path / "up", DistInfo())
    Trainer(micro_config(data=str(archive), resolution=8), tmp_path / "down", DistInfo())
    assert "images are 16x16, resized to 8x8 at every read" in (
        tmp_path / "down" / "log.txt").read_text()
    Trainer(micro_config(data=str(archive), resolution=16), tmp_path / "same", DistInfo())
    assert "resized" not in (tmp_path / "same" / "log.txt").read_text()


def test_the_files_a_dataset_skips_are_named_in_the_run_log_once(tmp_path):
    """log.txt is what a user reads after days of training: the files left out must be named
    there, not only on the stderr of whichever rank printed them."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not an image")
    Trainer(micro_config(data=str(images), resolution=16), tmp_path / "run", DistInfo())
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count("warning: skipping image 'broken.png'") == 1, log


def test_an_image_a_loader_worker_cannot_decode_is_named_in_the_run_log(tmp_path):
    """A truncated image passes the scan (it reads headers) and is skipped by the worker that
    decodes it: that worker's warning must reach log.txt too."""
    images = _random_image_folder(tmp_path / "images", count=4)
    data = (images / "2.png").read_bytes()
    (images / "2.png").write_bytes(data[: len(data) // 2])
    train(micro_config(steps=2, data=str(images), resolution=16, workers=1), tmp_path / "run")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "warning: skipping image '2.png'" in log, log


def test_a_micro_run_with_fp16_ada_and_r1_trains_on_the_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU (the CUDA path of the loop: fp16 layers, loss scaling, R1 "
                    "through the augmentation on CUDA)")
    config = micro_config(steps=2, device="cuda", aug="ada", precision="fp16", num_fp16_res=2,
                          adjust_interval=1, ada_target=-1.0, diffusion_target=-1.0,
                          d_reg_interval=1)
    result = train(config, tmp_path)
    assert result["step"] == 2
    state = _weights(result["checkpoint"])
    for net in ("G", "D", "G_ema"):
        for name, value in state[net].items():
            assert torch.isfinite(value).all(), (net, name)
    assert state["training"]["augment_p"] > 0
    log = (tmp_path / "log.txt").read_text()
    assert "on cuda" in log and "non-finite" not in log


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_training_steps_between_reports_never_wait_for_the_gpu(tmp_path, precision):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU: a host sync only exists where there is a device to wait for")
    from batikfast.data import make_loader
    config = micro_config(steps=20, device="cuda", precision=precision, num_fp16_res=2,
                          adjust_interval=4, aug="ada", ada_target=-1.0, diffusion_target=-1.0)
    trainer = Trainer(config, tmp_path, DistInfo(device=torch.device("cuda")))
    loader = make_loader(trainer.dataset, trainer.batch_gpu, num_workers=0)
    for _ in range(4):  # warm up: the first steps allocate Adam state and cache kernels
        trainer.train_step(loader)
    # the reals' copy to the GPU is the data loader's business (pinned memory in a real run)
    batches = [trainer._next_reals(loader) for _ in range(3)]
    trainer._next_reals = lambda _: batches.pop(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # steps 4..6: none is an adjust_interval step
            trainer.train_step(iter(()))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.report_faults()
    assert "non-finite" not in (tmp_path / "log.txt").read_text()


def _train_cli():
    import importlib.util
    spec = importlib.util.spec_from_file_location("batikfast_train_cli", REPO / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_cudagraphs_is_opt_in_and_refused_at_startup_without_a_gpu_or_compile(
        tmp_path, monkeypatch, capsys):
    cli = _train_cli()

    def config(*argv):
        return cli.config_from_args(cli.build_parser().parse_args(["--outdir", "x", *argv]))

    assert config()["cudagraphs"] is False
    with pytest.raises(ValueError, match="--cudagraphs needs a CUDA GPU.*--device cpu"):
        config("--cudagraphs", "--device", "cpu")
    assert cli.main(["--outdir", str(tmp_path / "run"), "--cudagraphs", "--device", "cpu"]) == 2
    assert "error: --cudagraphs needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="this machine has no CUDA GPU"):
        config("--cudagraphs")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config("--cudagraphs")["cudagraphs"] is True
    with pytest.raises(ValueError, match="cudagraphs=True needs compile.*compile=False"):
        config("--cudagraphs", "--no-compile")
    # the API refuses it too, where the device is known
    from batikfast.training.model import build_training_objects
    from batikfast.networks import Discriminator, Generator
    G = Generator(8, 0, 8, 8, 3, channel_base=64, channel_max=8)
    D = Discriminator(0, 8, 3, channel_base=64, channel_max=8)
    options = make_config("tiny", resolution=8, compile=True, cudagraphs=True, device="cpu")
    with pytest.raises(ValueError, match="cudagraphs=True needs a CUDA device, got device cpu"):
        build_training_objects(options, G, D, "cpu")


def test_a_device_this_machine_lacks_is_a_one_line_error_before_training(tmp_path, monkeypatch,
                                                                         capsys):
    cli = _train_cli()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, reason in (("cuda", "no GPU is visible"), ("cuda:1", "no GPU is visible"),
                           ("tpu", "must be auto, cpu, cuda or cuda:N")):
        assert cli.main(["--outdir", str(tmp_path / "run"), "--cfg", "tiny",
                         "--device", device]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --device") and reason in err and "\n" not in err, err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["--outdir", str(tmp_path / "run"), "--cfg", "tiny",
                     "--device", "cuda:1"]) == 2
    assert "--device cuda:1 was asked for but 1 GPU(s) are visible" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_training_step_benchmark_has_a_cudagraphs_variant_skipped_without_a_gpu(monkeypatch):
    from benchmarks import train_step
    args = train_step.parse_args([])
    assert args.compile_modes == ["eager", "compiled", "cudagraphs"]
    assert train_step.parse_args(["--quick"]).compile_modes == ["eager"]
    measured = []
    monkeypatch.setattr(train_step, "_measure_with_retries",
                        lambda args, device, backend, mode, precision, row: measured.append(mode))
    args = train_step.parse_args(["--backends", "ref", "--precision", "fp32", "--compile-modes",
                                  "compiled", "cudagraphs"])
    rows = train_step.run(args, torch.device("cpu"))
    assert measured == ["compiled"]
    assert rows[1]["config"] == "ref cudagraphs fp32"
    assert rows[1]["status"] == "skipped: CUDA graphs need a GPU, not cpu"
    assert train_step.COMPILE_MODES["cudagraphs"] == dict(compile=True, cudagraphs=True)
