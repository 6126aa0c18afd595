"""Process groups under torchrun, and the few collectives the loop needs.

A single process needs nothing: every helper here works with ``world_size == 1`` and no process
group. Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) the group uses NCCL on GPUs
and gloo on the CPU (chosen by the device the run uses, not by whether a GPU exists: ``--device
cpu`` on a GPU machine is gloo), and is created with a timeout, so that when one rank dies the others fail
with a clear message instead of waiting forever in a collective.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class RankFailure(RuntimeError):
    """Another rank stopped answering: this rank gives up instead of hanging."""


def check_device(device: str) -> str:
    """``--device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``) resolved for this machine, or a
    ValueError naming it: the commands report it in one line at startup instead of a traceback
    from torch's CUDA initialisation. Touches no GPU (``is_available`` does not initialise CUDA)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        requested = torch.device(device)
    except (RuntimeError, TypeError):
        requested = None
    if requested is None or requested.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if requested.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for but no GPU is visible "
                             "(use --device cpu)")
        gpus = torch.cuda.device_count()
        if requested.index is not None and requested.index >= gpus:
            raise ValueError(f"--device {device} was asked for but {gpus} GPU(s) are visible")
    return device


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun process group if there is one; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        requested = torch.device(check_device(device))
    except ValueError as error:  # the commands check first; direct callers get a RuntimeError
        raise RuntimeError(str(error)) from None
    if requested.type == "cuda":
        gpus = torch.cuda.device_count()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if requested.index is not None:
            index = _named_gpu(requested, world_size)
        elif world_size > 1 and local_world > gpus:
            # NCCL refuses two ranks on one GPU, and only after every rank has started.
            raise RuntimeError(
                f"{local_world} processes on this machine but {gpus} GPU(s) visible: NCCL needs "
                f"one GPU per process. Start at most {gpus} (torchrun --nproc-per-node {gpus}), "
                "or train on the CPU with --device cpu (gloo)")
        else:
            index = local_rank % gpus
        # Current, not only named: the RNG state in checkpoints, pinned copies and the Triton
        # kernels all use the current GPU.
        torch.cuda.set_device(index)
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = requested
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = dict(backend=backend, timeout=timeout)
        store = _store_of_this_attempt(timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world_size)
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        try:
            dist.init_process_group(**kwargs)
        except TypeError:  # older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
    return DistInfo(rank, world_size, local_rank, dev)


def _store_of_this_attempt(timeout: datetime.timedelta):
    """Under a one-node torchrun, its store with keys scoped to this restart attempt (else None).

    torchrun keeps one store across the restarts of an elastic run (unless
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and the process group's keys in it are not scoped by
    attempt: a restarted group reads the addresses the dead group published and fails to
    connect (gloo: "connection refused"; pytorch/pytorch#167288 for NCCL). Prefixing the keys
    with TORCHELASTIC_RESTART_COUNT gives every attempt fresh ones."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    shared_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    # One node only: each node's agent counts its own restarts (one restarted for another
    # node's failure does not count it), so across nodes the counts disagree. Multi-node
    # elastic runs take TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead (README).
    if attempt is None or not shared_agent_store or os.environ.get("GROUP_WORLD_SIZE") != "1":
        return None
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"batikfast/attempt-{attempt}", store)


def elastic_restart_warning() -> str | None:
    """Why an elastic restart of this multi-node torchrun would fail to reconnect, or None."""
    if (os.environ.get("GROUP_WORLD_SIZE", "1") != "1"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        return ("torchrun --max-restarts on several nodes with torchrun's shared store: a "
                "restarted group would read the dead group's addresses and fail to connect "
                "(pytorch/pytorch#167288). Start torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node.")
    return None


def _named_gpu(requested: torch.device, world_size: int) -> int:
    """The index of ``--device cuda:N`` (a GPU that exists: check_device), for one process only."""
    if world_size > 1:
        raise RuntimeError(
            f"--device {requested} names one GPU, but {world_size} processes run and each needs "
            "its own: pass --device cuda (each rank then takes the GPU of its LOCAL_RANK)")
    return requested.index


def shutdown(wait_for_peers: bool = False) -> None:
    """Leave the process group. ``wait_for_peers`` (a run that ended normally) meets the other
    ranks at a barrier first: a rank that tears gloo down while a peer is still finishing its
    last collective can abort the peer's process at exit ("terminate called without an active
    exception"). After an error nobody waits: a dead peer would hold the barrier until the
    timeout."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_peers and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except RuntimeError:  # a peer is gone: leave anyway
            pass
    dist.destroy_process_group()


def _collective(fn, *args, what: str):
    try:
        return fn(*args)
    except RuntimeError as error:  # DistBackendError and gloo/NCCL timeouts derive from it
        raise RankFailure(
            f"rank {dist.get_rank()}: {what} failed, most likely because another rank died or "
            f"hung ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Restart from the last checkpoint with --resume auto.") from error


def all_reduce_mean_(tensor: torch.Tensor, info: DistInfo, what: str = "gradient all-reduce"):
    if info.distributed:
        _collective(dist.all_reduce, tensor, what=what)
        tensor /= info.world_size
    return tensor


def all_reduce_sum_(tensor: torch.Tensor, info: DistInfo, what: str = "statistics all-reduce"):
    if info.distributed:
        _collective(dist.all_reduce, tensor, what=what)
    return tensor


def broadcast_(tensor: torch.Tensor, info: DistInfo, src: int = 0, what: str = "broadcast"):
    if info.distributed:
        _collective(dist.broadcast, tensor, src, what=what)
    return tensor


def barrier(info: DistInfo, what: str = "barrier") -> None:
    if info.distributed:
        _collective(dist.barrier, what=what)


def all_gather_objects(obj, info: DistInfo, what: str = "gather") -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    _collective(dist.all_gather_object, out, obj, what=what)
    return out


def broadcast_object(obj, info: DistInfo, what: str = "broadcast", src: int = 0):
    if not info.distributed:
        return obj
    holder = [obj]
    _collective(dist.broadcast_object_list, holder, src, what=what)
    return holder[0]
