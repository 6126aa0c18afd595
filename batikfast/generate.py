"""Generate batik images from a checkpoint's EMA generator.

    python -m batikfast.generate --ckpt runs/demo/checkpoint-00000025.pt --seeds 0-63 \
        --trunc 0.7 --out grid.png
    python -m batikfast.generate --ckpt ... --seeds 1,5,9 --outdir images/   # one PNG per seed

Seed ``s`` always gives the same latent (``z ~ N(0, I)`` from ``numpy.random.RandomState(s)``, as
NVIDIA's generate.py draws it), so images can be regenerated one at a time.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch


# A grid above this is too large to look at or to hold as one PNG (32x32 images of 256 px is
# 8192x8192 pixels); --outdir takes any number, written as they are generated.
MAX_GRID_IMAGES = 1024
# Seeds are expanded into a list: a mistyped range (0-10000000000) must fail, not fill memory.
MAX_SEEDS = 10_000_000
MAX_SEED = 2**32 - 1


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``. Seeds are 0 to :data:`MAX_SEED`, the seeds numpy's
    RandomState takes: a seed past them (or a negative one) would alias another seed's image."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"([0-9]+)(?:\s*-\s*([0-9]+))?", part)
        if not match:
            raise ValueError(f"--seeds {text!r}: {part!r} is neither a seed (0 to {MAX_SEED}) "
                             "nor a range of them (a-b)")
        lo = int(match[1])
        hi = lo if match[2] is None else int(match[2])
        if hi < lo:
            raise ValueError(f"--seeds range {part!r} is empty")
        if len(seeds) + hi - lo + 1 > MAX_SEEDS:
            raise ValueError(f"--seeds {text!r} names more than {MAX_SEEDS} seeds; "
                             "generate them in several calls")
        if hi > MAX_SEED:
            raise ValueError(f"--seeds {text!r}: seeds go from 0 to {MAX_SEED} (numpy's "
                             f"RandomState), got {hi}")
        seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ValueError(f"--seeds {text!r} names no seed")
    return seeds


def check_truncation(psi: float) -> None:
    """Any finite psi is meaningful (0 gives the average image, below 0 or above 1
    extrapolates away from it, as NVIDIA's generator allows); nan or inf make every pixel nan."""
    if not math.isfinite(psi):
        raise ValueError(f"--trunc must be a finite number, got {psi}")


def latents(seeds, z_dim: int) -> torch.Tensor:
    """``z`` of each seed; a seed outside 0 to :data:`MAX_SEED` is a ValueError (numpy's)."""
    return torch.from_numpy(np.stack([np.random.RandomState(s).randn(z_dim)
                                      for s in seeds])).float()


def generate_images(G, seeds, truncation_psi: float = 1.0, class_idx: int | None = None,
                    noise_mode: str = "const", batch: int = 16, device="cpu") -> torch.Tensor:
    """uint8 images ``[len(seeds), C, H, W]``."""
    return torch.cat([images for _, images in generate_batches(
        G, seeds, truncation_psi, class_idx, noise_mode, batch, device)])


def generate_batches(G, seeds, truncation_psi: float = 1.0, class_idx: int | None = None,
                     noise_mode: str = "const", batch: int = 16, device="cpu"):
    """Yields ``(seeds of the batch, uint8 images [n, C, H, W] on the CPU)``: memory stays
    one batch however many seeds there are."""
    from batikfast.metrics.compute import to_uint8

    check_truncation(truncation_psi)
    if G.c_dim and class_idx is None:
        raise ValueError(f"this generator is conditional ({G.c_dim} classes): pass --class")
    if not G.c_dim and class_idx is not None:
        # it would be ignored: the images would not be of the class asked for
        raise ValueError(f"--class {class_idx} was given but this generator is unconditional "
                         "(trained without labels): leave --class out")
    if G.c_dim and not 0 <= class_idx < G.c_dim:
        raise ValueError(f"--class must be in [0, {G.c_dim}), got {class_idx}")
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        c = torch.zeros([len(chunk), G.c_dim])
        if G.c_dim:
            c[:, class_idx] = 1
        with torch.no_grad():
            images = G(latents(chunk, G.z_dim).to(device), c.to(device),
                       truncation_psi=truncation_psi, noise_mode=noise_mode)
        yield chunk, to_uint8(images).cpu()


def main(argv=None) -> int:
    from batikfast.training.checkpoint import CheckpointError, load_generator
    from batikfast.training.distributed import check_device

    parser = argparse.ArgumentParser(description="Generate images from a batikfast checkpoint")
    parser.add_argument("--ckpt", required=True, help="checkpoint file (checkpoint-*.pt)")
    parser.add_argument("--seeds", default="0-15", help="e.g. 0-63 or 1,5,9")
    parser.add_argument("--trunc", type=float, default=1.0,
                        help="truncation psi: 1 none, 0 the average image (any finite number)")
    parser.add_argument("--class", dest="class_idx", type=int, default=None,
                        help="class index (conditional generators only, where it is required)")
    parser.add_argument("--noise-mode", default="const", choices=["const", "random", "none"])
    parser.add_argument("--out", default=None, help="write one grid PNG here")
    parser.add_argument("--outdir", default=None, help="write one PNG per seed here")
    parser.add_argument("--columns", type=int, default=None)
    parser.add_argument("--device", default="auto",
                        help="auto (the GPU when there is one) | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    if not args.out and not args.outdir:
        args.out = "grid.png"
    try:
        seeds = _check_args(args)
        device = check_device(args.device)
        _make_output_folders(args)
        G, _ = load_generator(args.ckpt, device=device)
        batches = generate_batches(G, seeds, args.trunc, args.class_idx, args.noise_mode,
                                   device=device)
        _write_images(args, seeds, batches)
    except (ValueError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _check_args(args) -> list[int]:
    """The seeds; every option that can be checked without the checkpoint, checked."""
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as error:
        message = str(error) if "--seeds" in str(error) else f"--seeds {args.seeds!r}: {error}"
        raise ValueError(message) from None
    check_truncation(args.trunc)
    if args.class_idx is not None and args.class_idx < 0:
        raise ValueError(f"--class must be a class index (0 or more), got {args.class_idx}")
    if args.columns is not None and args.columns < 1:
        raise ValueError(f"--columns must be at least 1, got {args.columns}")
    if args.out and Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out {args.out!r}: the grid is written as PNG, name it *.png")
    if args.out and len(seeds) > MAX_GRID_IMAGES:
        raise ValueError(f"--out: a grid holds at most {MAX_GRID_IMAGES} images, --seeds names "
                         f"{len(seeds)}; write them one per file with --outdir instead")
    return seeds


def _make_output_folders(args) -> None:
    """Before generating: an output that cannot be written is found before the work is done."""
    from batikfast.training.rundir import OutputDirError, check_output_dir

    for option, folder in (("--out", args.out and Path(args.out).parent),
                           ("--outdir", args.outdir and Path(args.outdir))):
        if not folder:
            continue
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{option}: {str(folder)!r} is a file, not a folder")
        try:
            check_output_dir(folder, option=option)
        except OutputDirError as error:
            raise ValueError(str(error)) from None


def _write_images(args, seeds, batches) -> None:
    """Each seed's PNG as its batch comes (--outdir); the grid at the end (--out)."""
    from batikfast.training.rundir import save_image_grid

    kept = []
    for chunk, images in batches:
        if args.outdir:
            _write_seed_images(Path(args.outdir), chunk, images)
        if args.out:
            kept.append(images)
    if args.outdir:
        print(f"wrote {len(seeds)} images to {args.outdir}")
    if args.out:
        try:
            save_image_grid(torch.cat(kept), args.out, args.columns)
        except OSError as error:
            raise ValueError(f"cannot write --out {args.out!r}: {error.strerror or error}") from None
        print(f"wrote a grid of {len(seeds)} images to {args.out}")


def _write_seed_images(folder: Path, seeds, images) -> None:
    from PIL import Image

    for seed, image in zip(seeds, images.numpy()):
        array = image.transpose(1, 2, 0)
        path = folder / f"seed{seed:04d}.png"
        try:
            Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)
        except OSError as error:
            raise ValueError(f"cannot write {str(path)!r} in --outdir: "
                             f"{error.strerror or error}") from None


if __name__ == "__main__":
    sys.exit(main())
