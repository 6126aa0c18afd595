"""Feeding the training loop: a resumable infinite sampler sharded across ranks, and the loader.

The sampler walks one global stream of dataset indices (a fresh permutation per epoch, drawn
from ``(seed, epoch)``). Rank ``r`` of ``W`` takes stream positions ``r, r + W, r + 2W, ...``, so
each training step of ``batch`` images consumes stream positions ``[k * batch, (k + 1) * batch)``
across all ranks whatever ``W`` is. Resuming at ``cur_nimg`` images therefore continues the same
stream exactly, also on another number of GPUs.
"""
from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch
import torch.utils.data

from batikfast.data.batik import BuiltinBatikDataset
from batikfast.data.dataset import Dataset, DatasetError, ImageFolderDataset


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless, resumable, rank-sharded stream of dataset indices.

    Args:
        dataset_size: number of items.
        rank, world_size: this process and the number of processes.
        seed: the permutation of each epoch is drawn from ``(seed, epoch)``.
        shuffle: False walks the dataset in order.
        start: global stream position to start from (the number of images already consumed).
    """

    def __init__(self, dataset_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, start: int = 0):
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.dataset_size = int(dataset_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.start = int(seed), bool(shuffle), int(start)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)

    def __iter__(self):
        position = self.start + ((self.rank - self.start) % self.world_size)
        epoch, order = None, None
        while True:
            this_epoch = position // self.dataset_size
            if this_epoch != epoch:
                epoch, order = this_epoch, self._order(this_epoch)
            yield int(order[position % self.dataset_size])
            position += self.world_size


def open_dataset(data: str, resolution: int | None = None, xflip: bool = False,
                 use_labels: bool = False, seed: int = 0, size: int = 20000,
                 max_size: int | None = None) -> Dataset:
    """``"builtin"`` (procedural batik), or a folder / zip of images."""
    if data in (None, "", "builtin"):
        return BuiltinBatikDataset(resolution=resolution or 256, size=max_size or size,
                                   seed=seed, xflip=xflip, use_labels=use_labels)
    return ImageFolderDataset(data, resolution=resolution, use_labels=use_labels, xflip=xflip,
                              max_size=max_size)


def _collate(items):
    images = torch.from_numpy(np.stack([image for image, _ in items]))
    labels = torch.from_numpy(np.stack([label for _, label in items]))
    return images, labels


def make_loader(dataset: Dataset, batch_gpu: int, rank: int = 0, world_size: int = 1,
                seed: int = 0, start: int = 0, num_workers: int = 2, pin_memory: bool = False,
                prefetch_factor: int = 2, warning_log: str | os.PathLike | None = None):
    """An endless iterator of ``(uint8 images [N, C, H, W], float32 labels [N, label_dim])``.

    ``num_workers=0`` loads in the main process (tests, tiny CPU runs). Workers are persistent
    and prefetch ``prefetch_factor`` batches each; ``pin_memory`` lets the host-to-GPU copy
    overlap the step (``.to(device, non_blocking=True)``). ``warning_log``: a file to which
    the workers also append their warnings (files skipped at read time), one line each.
    """
    if batch_gpu < 1:
        raise ValueError(f"batch_gpu must be >= 1, got {batch_gpu}")
    sampler = InfiniteSampler(len(dataset), rank, world_size, seed, start=start)
    kwargs = {}
    if num_workers > 0:
        kwargs = dict(persistent_workers=True, prefetch_factor=prefetch_factor)
        if warning_log is not None:
            kwargs["worker_init_fn"] = functools.partial(_copy_warnings_to, os.fspath(warning_log))
    # A private generator: creating the iterator would otherwise draw the workers' base seed
    # from the global RNG, and a resumed run (iterator created after the RNG state is restored)
    # would drift from an uninterrupted one. Items depend on their index only.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_gpu, sampler=sampler,
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         collate_fn=_collate,
                                         generator=torch.Generator().manual_seed(seed), **kwargs)
    return _batches(iter(loader)) if num_workers > 0 else iter(loader)


def _copy_warnings_to(path: str, worker_id: int) -> None:
    """In a loader worker: every warning still goes to stderr, and also to the end of
    ``path`` (the run's log, which the main process appends to as well: one short write per
    line in append mode, so lines do not interleave)."""
    show = warnings.showwarning

    def show_and_append(message, category, filename, lineno, file=None, line=None):
        show(message, category, filename, lineno, file, line)
        try:
            with open(path, "a", encoding="utf-8") as log:
                log.write(f"warning: {message}\n")
        except OSError:
            pass  # the log is a copy: the warning is on stderr, and training goes on

    warnings.showwarning = show_and_append


def _batches(batches):
    """``batches``, with a ``DatasetError`` raised in a worker re-raised as its own message.

    The DataLoader re-raises a worker's exception with the worker's traceback as its message:
    train.py would print that traceback where it prints one ``error:`` line naming the file."""
    try:
        yield from batches
        return
    except DatasetError as error:
        message = _worker_error_message(str(error))
    # The workers are stopped now: the iterator is in reference cycles, and when the garbage
    # collector stops them instead (at exit, say), each waits out a 5 s timeout.
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch has no public close()
    if shutdown is not None:
        shutdown()
    raise DatasetError(message)  # outside the handler: without the worker's traceback


def _worker_error_message(text: str) -> str:
    """The message of the ``DatasetError`` in a worker traceback (``text`` when it is none)."""
    if not text.startswith("Caught DatasetError"):
        return text
    return text.rstrip().rsplit("DatasetError: ", 1)[-1]
