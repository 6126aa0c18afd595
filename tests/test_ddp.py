"""Two CPU processes over gloo: the same gradients as one process, identical adaptive state,
checkpoints that resume on another number of processes, and a clear exit when a rank dies.

The ranks are pinned to the CPU (``init_distributed("cpu")``, ``device="cpu"`` in the configs)
and check that they got gloo and CPU tensors, so the test means the same on a GPU machine (two
ranks there must not share one GPU through NCCL)."""
import json
import multiprocessing
import os
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch

from batikfast.training import checkpoint as ckpt
from tests.test_training import BATCH, _recording_trainer, micro_config

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grad_config(**overrides):
    # Per-sample randomness that ranks cannot share is switched off (diffusion t and noise,
    # style mixing, path-length noise); minibatch-std groups of 2 see the same images on 2
    # ranks of 2 as on 1 rank of 4 because the stream is dealt out round-robin.
    options = dict(diffusion=False, aug="no", style_mixing=0.0, pl_weight=0.0,
                   d_reg_interval=1, mbstd_group=2)
    options.update(overrides)
    return micro_config(**options)


def _worker(rank, port, outdir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    outdir = Path(outdir)
    try:
        from batikfast.data import make_loader
        from batikfast.training import distributed as dist_utils
        from batikfast.training.loop import train

        if mode == "grads":
            info = dist_utils.init_distributed("cpu", timeout_s=60)
            import torch.distributed as dist

            (outdir / f"where{rank}.txt").write_text(f"{info.device.type} {dist.get_backend()}")
            trainer = _recording_trainer(_grad_config(batch_gpu=BATCH // WORLD),
                                         outdir / "grads_run", info)
            trainer.train_step(make_loader(trainer.dataset, trainer.batch_gpu, rank, WORLD,
                                           num_workers=0))
            torch.save(trainer.recorded, outdir / f"grads{rank}.pt")
            # a whole run with diffusion and ADA: checkpoints, adaptive p and T on every rank
            config = micro_config(steps=4, aug="ada", adjust_interval=2, diffusion_target=-1.0,
                                  batch_gpu=BATCH // WORLD, ddp_timeout_s=60)
            result = train(config, outdir / "run")  # joins the group made above, then ends it
            torch.save({"step": result["step"], "training": result["training_state"]},
                       outdir / f"result{rank}.pt")
        elif mode in ("whole", "stop", "resume"):
            # diffusion with ADA, p updated every 2 steps and path length every 4: a stop at
            # step 3 falls between updates, with each rank's own w_avg and path-length mean
            options = dict(steps=6, aug="ada", adjust_interval=2, diffusion_target=-1.0,
                           batch_gpu=BATCH // WORLD, ddp_timeout_s=60, seed=7)
            if mode == "stop":
                options["stop_after_steps"] = 3
            train(micro_config(**options), outdir / ("whole" if mode == "whole" else "split"),
                  resume="auto" if mode == "resume" else None)
        elif mode == "tensorboard":
            from tests.test_training import fake_tensorboard_module

            tensorboard = sys.modules["torch.utils.tensorboard"] = fake_tensorboard_module()
            train(micro_config(steps=2, batch_gpu=BATCH // WORLD, ddp_timeout_s=60),
                  outdir / "run")
            writers = [{"log_dir": w.log_dir, "closed": w.closed,
                        "steps": sorted({step for *_, step in w.scalars})}
                       for w in tensorboard.SummaryWriter.made]
            (outdir / f"tensorboard{rank}.json").write_text(json.dumps(writers))
        elif mode == "dead":
            info = dist_utils.init_distributed("cpu", timeout_s=20)
            if rank == 1:
                os._exit(17)  # dies without a word, as a crashed or OOM-killed rank does
            try:
                dist_utils.barrier(info)
                dist_utils.all_reduce_mean_(torch.ones(3), info)
            except dist_utils.RankFailure as error:
                (outdir / "rank0_error.txt").write_text(str(error))
                os._exit(5)
            (outdir / "rank0_error.txt").write_text("no error raised")
    except BaseException:
        (outdir / f"crash{rank}.txt").write_text(traceback.format_exc())
        raise


def _run(mode, outdir, timeout=180):
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [ctx.Process(target=_worker, args=(rank, port, str(outdir), mode))
                 for rank in range(WORLD)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout)
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in processes]


def _crashes(outdir):
    return "\n".join(p.read_text() for p in Path(outdir).glob("crash*.txt"))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_gloo_ranks_match_one_process_and_share_adaptive_state(tmp_path):
    codes = _run("grads", tmp_path)
    assert codes == [0, 0], _crashes(tmp_path)
    for rank in range(WORLD):  # also where a GPU is visible
        assert (tmp_path / f"where{rank}.txt").read_text() == "cpu gloo"

    # the gradients after the all-reduce equal one process's on the same global batch
    single = _recording_trainer(_grad_config(batch_gpu=BATCH), tmp_path / "single")
    from batikfast.data import make_loader
    single.train_step(make_loader(single.dataset, single.batch_gpu, num_workers=0))
    grads = [torch.load(tmp_path / f"grads{r}.pt") for r in range(WORLD)]
    for phase in ("Gmain", "Dmain", "Dreg"):
        assert grads[0][phase].keys() == single.recorded[phase].keys()
        for name, expected in single.recorded[phase].items():
            assert torch.equal(grads[0][phase][name], grads[1][phase][name]), (phase, name)
            torch.testing.assert_close(grads[0][phase][name], expected, rtol=1e-4, atol=1e-6,
                                       msg=f"{phase} {name}")

    # the whole run wrote one checkpoint holding both ranks' RNG and an adapted p and T
    results = [torch.load(tmp_path / f"result{r}.pt") for r in range(WORLD)]
    assert [r["step"] for r in results] == [4, 4]
    for key in ("p", "T", "pool"):  # every rank adapted p and T identically
        a, b = (r["training"]["diffusion"][key] for r in results)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    assert results[0]["training"]["augment_p"] == results[1]["training"]["augment_p"] > 0
    run = tmp_path / "run"
    state = ckpt.load_checkpoint(ckpt.latest_valid_checkpoint(run))
    assert len(state["rng"]) == WORLD and state["progress"]["world_size"] == WORLD
    diffusion = state["training"]["diffusion"]
    assert diffusion["p"] > 0 and state["training"]["augment_p"] > 0

    # and resumes in a single process (another number of GPUs)
    from batikfast.training.loop import train
    result = train(micro_config(steps=6, aug="ada", adjust_interval=2, diffusion_target=-1.0),
                   run, resume="auto")
    assert result["step"] == 6
    assert "reseeded" in (run / "log.txt").read_text()


def test_two_ranks_stopped_and_resumed_equal_an_uninterrupted_two_rank_run_bit_for_bit(tmp_path):
    """Each rank's own running means (G's w_avg, the path-length mean) and its share of the
    adaptive-p signs are saved per rank: a resume that gave every rank rank 0's trained
    other weights than the uninterrupted run."""
    for mode in ("whole", "stop", "resume"):  # fresh processes: a process group per run
        assert _run(mode, tmp_path) == [0, 0], _crashes(tmp_path)
    from tests.test_training import _same_state
    whole, split = (ckpt.load_checkpoint(ckpt.latest_valid_checkpoint(tmp_path / name))
                    for name in ("whole", "split"))
    assert split["progress"]["step"] == whole["progress"]["step"] == 6
    assert "resumed from" in (tmp_path / "split" / "log.txt").read_text()
    for key in ("G", "D", "G_ema", "G_opt", "D_opt", "training", "rng"):
        _same_state(whole[key], split[key], key)
    # the ranks really differ in what they keep for themselves
    assert not torch.equal(*(r["w_avg"] for r in whole["rank_state"]))
    _same_state(whole["rank_state"], split["rank_state"], "rank_state")


def test_only_rank_0_writes_tensorboard_scalars_and_it_closes_its_writer(tmp_path):
    assert _run("tensorboard", tmp_path) == [0, 0], _crashes(tmp_path)
    writers = [json.loads((tmp_path / f"tensorboard{rank}.json").read_text())
               for rank in range(WORLD)]
    assert writers == [[{"log_dir": str(tmp_path / "run"), "closed": True,
                         "steps": [BATCH, 2 * BATCH]}], []]


def test_a_dead_rank_makes_the_others_exit_with_a_clear_message(tmp_path):
    codes = _run("dead", tmp_path, timeout=120)
    assert codes[1] == 17
    message = (tmp_path / "rank0_error.txt").read_text() if (tmp_path / "rank0_error.txt").exists() \
        else _crashes(tmp_path)
    assert codes[0] == 5, message
    assert "another rank died" in message and "--resume auto" in message


def test_more_ranks_than_gpus_is_a_clear_error_before_nccl_starts(monkeypatch):
    from batikfast.training import distributed as dist_utils

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda *a: pytest.fail("no GPU may be touched before the check"))
    with pytest.raises(RuntimeError, match="one GPU per process.*--device cpu"):
        dist_utils.init_distributed("cuda")
    with pytest.raises(RuntimeError, match="one GPU per process"):
        dist_utils.init_distributed("auto")  # auto picks the GPU when one is visible


def test_a_named_gpu_is_made_the_current_one(monkeypatch):
    """The checkpoint's CUDA RNG state, pinned copies and Triton launches all use the current
    GPU: ``--device cuda:1`` must make GPU 1 current, not only put the networks there."""
    from batikfast.training import distributed as dist_utils

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    current = [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: current.__setitem__(0, index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    info = dist_utils.init_distributed("cuda:1")
    assert current == [1] and info.device == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="cuda:2 was asked for but 2 GPU"):
        dist_utils.init_distributed("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="names one GPU, but 2 processes.*--device cuda"):
        dist_utils.init_distributed("cuda:1")


def _tiny_cpu_run(outdir, *options):
    """train.py and its arguments for a 16x16 run of batch 4 on the CPU."""
    repo = Path(__file__).resolve().parent.parent
    return [str(repo / "train.py"), "--outdir", str(outdir), "--cfg", "tiny", "--resolution",
            "16", "--batch", "4", "--device", "cpu", "--workers", "0", "--no-compile", *options]


def _start(command, tmp_path, **env):
    """A torchrun agent, one thread per rank, printing into a pipe."""
    import subprocess
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo), **env)
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_until(ready, agents, what):
    """Poll ``ready()`` while every agent runs, for up to three minutes."""
    import time
    deadline = time.time() + 180
    while not ready():
        assert all(a.poll() is None for a in agents) and time.time() < deadline, what
        time.sleep(0.05)


def _checkpoint_past(run, step):
    """Whether ``run`` holds a checkpoint beyond ``step`` (older ones are pruned as it goes)."""
    return any(int(p.stem.split("-")[1]) >= step for p in run.glob("checkpoint-*.pt"))


def _standalone_torchrun(*arguments):
    import sys
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            *arguments]


def _rendezvous_host():
    """(endpoint, store): a c10d rendezvous store served by this test process. Two torchrun
    agents on one machine would otherwise host it in whichever starts first, which may exit
    before the other has left the rendezvous (the other then fails on a closed connection
    after its workers succeeded: a race of torchrun's, not of the run's)."""
    port = _free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True,
                                       wait_for_workers=False)
    return f"127.0.0.1:{port}", store


def _torchrun_node_command(endpoint, *arguments):
    import sys
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-conf=is_host=0",
            "--rdzv-id=batikfast-two-nodes", *arguments]


def _two_torchrun_nodes(outdirs, tmp_path, *options):
    """Two torchrun agents (two 'nodes' on this machine, one CPU process each) meeting through
    the c10d rendezvous, each writing to its own --outdir; returns their combined output."""
    endpoint, _store = _rendezvous_host()
    nodes = [_start(_torchrun_node_command(endpoint, "--max-restarts=0", *_tiny_cpu_run(
        outdir, "--tick", "0.004", "--snap", "1", *options)), tmp_path) for outdir in outdirs]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    return "\n".join(outputs)


def test_torchrun_two_nodes_meet_through_the_c10d_rendezvous_and_train_as_one_run(tmp_path):
    """The README's multi-node command for real. Each process is LOCAL_RANK 0 of its node, so
    global RANK must drive data sharding and writing, not LOCAL_RANK."""
    run = tmp_path / "run"  # shared, as a network file system would be between nodes
    _two_torchrun_nodes([run, run], tmp_path, "--kimg", "0.008")
    state = ckpt.load_checkpoint(ckpt.latest_valid_checkpoint(run))
    assert state["progress"]["world_size"] == 2 and state["progress"]["step"] == 2
    assert len(state["rng"]) == 2  # one RNG state per global rank
    log = (run / "log.txt").read_text()
    assert "batch 4 = 2 processes x 1 rounds x 2" in log
    assert log.count("starting from scratch") == 1  # one writer: global rank 0


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """{global rank: pid} of a torchrun agent's worker processes (Linux /proc)."""
    workers = {}
    for task in Path(f"/proc/{agent_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile
                continue
            for entry in environ:
                if entry.startswith(b"RANK="):
                    workers[int(entry[5:])] = int(pid)
    return workers


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers "
                    "through Linux /proc")
def test_torchrun_restarts_the_group_after_a_killed_worker_and_the_run_resumes(tmp_path):
    """Elastic restart: SIGKILL one of two ranks mid-run; torchrun stops the other and starts
    both again, and with ``--resume auto`` they continue from the newest valid checkpoint to
    the end."""
    import signal
    run = tmp_path / "run"
    agent = _start(_standalone_torchrun("--max-restarts=1", *_tiny_cpu_run(
        run, "--resume", "auto", "--kimg", "0.2", "--tick", "0.004", "--snap", "1",
        "--image-snap", "1000")), tmp_path)
    try:
        _wait_until(lambda: _checkpoint_past(run, 3), [agent], "no checkpoint appeared")
        os.kill(_worker_pids(agent.pid)[1], signal.SIGKILL)
        output = agent.communicate(timeout=300)[0]
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, output[-3000:]
    log = (run / "log.txt").read_text()
    assert log.count("resumed from") == 1, output[-3000:]
    state = ckpt.load_checkpoint(ckpt.latest_valid_checkpoint(run))
    assert state["progress"]["step"] == 50 and state["progress"]["world_size"] == 2


def test_sigterm_to_torchrun_makes_every_rank_save_a_checkpoint_and_stop(tmp_path):
    """A scheduler's SIGTERM goes to torchrun, which passes it on to its workers: the ranks
    agree to stop, write one checkpoint of the step they reached and exit."""
    import signal
    run = tmp_path / "run"
    agent = _start(_standalone_torchrun(*_tiny_cpu_run(
        run, "--kimg", "10", "--tick", "0.04", "--snap", "1000", "--image-snap", "1000")),
        tmp_path)
    log_file = run / "log.txt"
    try:
        _wait_until(lambda: log_file.exists() and "tick 0 " in log_file.read_text(), [agent],
                    "training did not start")
        agent.send_signal(signal.SIGTERM)
        output = agent.communicate(timeout=120)[0]
    finally:
        if agent.poll() is None:
            agent.kill()
    log = (run / "log.txt").read_text()
    assert "SIGTERM received" in log and "stopped by SIGTERM" in log, output[-3000:]
    state = ckpt.load_checkpoint(ckpt.latest_valid_checkpoint(run))
    assert state["progress"]["world_size"] == 2 and state["progress"]["step"] >= 10


def test_a_hung_rank_stops_the_other_after_the_ddp_timeout_with_one_line(tmp_path):
    """A rank that stops answering without dying (a stopped process, a node that lost power:
    no connection is closed) is only noticed by the timeout, which --ddp-timeout sets (it was
    fixed at 600 s, with no option). The other rank ends with one line naming the collective
    that failed, not a traceback."""
    import signal
    import subprocess
    import sys
    import time
    run, port, timeout = tmp_path / "run", _free_port(), 8
    ranks = [_start([sys.executable, *_tiny_cpu_run(
        run, "--kimg", "10", "--tick", "0.004", "--snap", "1000", "--image-snap", "1000",
        "--ddp-timeout", str(timeout))], tmp_path, RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for rank in (0, 1)]
    try:
        log_file = run / "log.txt"
        _wait_until(lambda: log_file.exists() and "tick 2 " in log_file.read_text(), ranks,
                    "training did not start")
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.time()
        output = ranks[0].communicate(timeout=timeout + 60)[0]
        waited = time.time() - stopped
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    assert ranks[0].returncode == 1, output[-3000:]
    assert timeout - 1 < waited < timeout + 45, waited
    assert "error: rank 0:" in output and "another rank died or hung" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers "
                    "through Linux /proc")
def test_sigkill_to_torchrun_makes_its_orphaned_ranks_save_a_checkpoint_and_stop(tmp_path):
    """torchrun killed with SIGKILL cannot pass anything on: its workers, re-parented, went on
    training to the end of the run (days, holding the GPUs, writing into the run folder beside
    a restarted one). They now stop as on SIGTERM, with one checkpoint."""
    import signal
    import time
    run = tmp_path / "run"
    agent = _start(_standalone_torchrun(*_tiny_cpu_run(
        run, "--kimg", "10", "--tick", "0.04", "--snap", "1000", "--image-snap", "1000")),
        tmp_path)
    log_file = run / "log.txt"

    def running(pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        return "\nState:\tZ" not in status  # a zombie has exited

    workers = []
    try:
        _wait_until(lambda: log_file.exists() and "tick 0 " in log_file.read_text(), [agent],
                    "training did not start")
        workers = list(_worker_pids(agent.pid).values())
        assert len(workers) == 2
        agent.kill()
        agent.wait()
        deadline = time.time() + 120
        while any(running(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.1)
        alive = [pid for pid in workers if running(pid)]
    finally:
        if agent.poll() is None:
            workers = workers or list(_worker_pids(agent.pid).values())
            agent.kill()
            agent.wait()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert not alive, "torchrun's workers kept training after it was killed"
    log = log_file.read_text()
    assert "which started this rank, is gone" in log and "stopped by the exit of torchrun" in log
    state = ckpt.load_checkpoint(ckpt.latest_valid_checkpoint(run))
    assert state["progress"]["world_size"] == 2 and state["progress"]["cur_nimg"] < 10000


def test_nodes_without_a_shared_run_folder_resume_together_from_the_one_checkpoint(tmp_path):
    """Only the node of global rank 0 writes checkpoints. Resuming with folders that are not
    shared, one node finds a checkpoint and the other none: both must continue from it (a rank
    starting afresh would train other weights on another step count)."""
    folders = [tmp_path / "node_a", tmp_path / "node_b"]
    _two_torchrun_nodes(folders, tmp_path, "--kimg", "0.008")  # 2 steps
    written = [f for f in folders if ckpt.latest_valid_checkpoint(f, warn=lambda m: None)]
    assert len(written) == 1  # the folder of whichever node held rank 0
    output = _two_torchrun_nodes(folders, tmp_path, "--kimg", "0.016", "--resume", "auto")
    final = [ckpt.latest_valid_checkpoint(f, warn=lambda m: None) for f in folders]
    states = [ckpt.load_checkpoint(p) for p in final if p is not None]
    assert max(s["progress"]["step"] for s in states) == 4  # 2 resumed + 2 more, not 4 fresh
    assert "every rank continues from rank" in output
    logs = "".join((f / "log.txt").read_text() for f in folders if (f / "log.txt").exists())
    assert logs.count("starting from scratch") == 1 and logs.count("resumed from") == 1


def test_nodes_restart_together_after_a_killed_worker_with_unshared_rendezvous_stores(tmp_path):
    """Two torchrun nodes under --max-restarts=1 and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (what
    the README asks of multi-node elastic runs): SIGKILL one node's worker mid-run; both nodes
    restart their workers, which resume from the newest checkpoint and finish."""
    import signal
    run = tmp_path / "run"
    endpoint, _store = _rendezvous_host()
    command = _torchrun_node_command(endpoint, "--max-restarts=1", *_tiny_cpu_run(
        run, "--resume", "auto", "--kimg", "0.2", "--tick", "0.004", "--snap", "1",
        "--image-snap", "1000"))
    agents = [_start(command, tmp_path, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
              for _ in range(2)]
    try:
        _wait_until(lambda: _checkpoint_past(run, 3), agents, "no checkpoint appeared")
        workers = {}
        for agent in agents:
            workers.update(_worker_pids(agent.pid))
        os.kill(workers[1], signal.SIGKILL)
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-3000:]
    assert (run / "log.txt").read_text().count("resumed from") == 1
    state = ckpt.load_checkpoint(ckpt.latest_valid_checkpoint(run))
    assert state["progress"]["step"] == 50 and state["progress"]["world_size"] == 2


def test_multi_node_elastic_runs_on_the_shared_store_are_warned_with_the_fix(monkeypatch):
    from batikfast.training import distributed as dist_utils
    torchrun = dict(GROUP_WORLD_SIZE="2", TORCHELASTIC_MAX_RESTARTS="3",
                    TORCHELASTIC_USE_AGENT_STORE="True")
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in dist_utils.elastic_restart_warning()
    for harmless in (dict(GROUP_WORLD_SIZE="1"), dict(TORCHELASTIC_MAX_RESTARTS="0"),
                     dict(TORCHELASTIC_USE_AGENT_STORE="False")):
        with monkeypatch.context() as m:
            for name, value in harmless.items():
                m.setenv(name, value)
            assert dist_utils.elastic_restart_warning() is None, harmless


def test_ranks_notice_a_torchrun_agent_lost_before_their_training_loop_started(monkeypatch):
    """The agent is whoever started the rank: one killed while the ranks were still setting up
    (reading the dataset, resuming: minutes) must stop them too, not be replaced by init."""
    from batikfast.training import loop
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "batikfast-test")
    # the rank's parent when it started, gone since (its parent is now another process)
    monkeypatch.setattr(loop, "_PARENT_AT_IMPORT", os.getppid() + 1, raising=False)

    class Run:
        stop_signal = None

    run = Run()
    loop.Trainer._check_launcher(run, loop.Trainer._launcher_pid())
    assert run.stop_signal == "the exit of torchrun"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert loop.Trainer._launcher_pid() is None  # outside torchrun, a parent may come and go


def test_a_rank_failure_leaves_the_broken_process_group_alone(tmp_path, monkeypatch):
    """Destroying a gloo group whose peer hung makes gloo's worker thread call std::terminate:
    after its one error line the rank died of SIGABRT (exit -6, a core) in about a third of
    the runs. train() no longer tears such a group down; train.py leaves with os._exit."""
    from batikfast.training import distributed as dist_utils
    from batikfast.training import loop
    calls = []
    monkeypatch.setattr(loop.dist_utils, "shutdown", lambda **kwargs: calls.append(kwargs))

    def failing(*args):
        raise dist_utils.RankFailure("rank 0: gradient all-reduce failed")

    monkeypatch.setattr(loop, "_train", failing)
    with pytest.raises(dist_utils.RankFailure):
        loop.train(micro_config(), tmp_path / "run")
    assert calls == []  # train.py's exit status on it: test_a_hung_rank_stops_the_other_...
