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
import sys
from pathlib import Path

import numpy as np
import torch


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1) if not part.startswith("-") else part.rsplit("-", 1)
            lo, hi = int(lo), int(hi)
            if hi < lo:
                raise ValueError(f"--seeds range {part!r} is empty")
            seeds.extend(range(lo, hi + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise ValueError(f"--seeds {text!r} names no seed")
    return seeds


def check_truncation(psi: float) -> None:
    """Any finite psi is meaningful (0 gives the average image, below 0 or above 1
    extrapolates away from it, as NVIDIA's generator allows); nan or inf make every pixel nan."""
    if not math.isfinite(psi):
        raise ValueError(f"--trunc must be a finite number, got {psi}")


def latents(seeds, z_dim: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.random.RandomState(s % 2**32).randn(z_dim)
                                      for s in seeds])).float()


@torch.no_grad()
def generate_images(G, seeds, truncation_psi: float = 1.0, class_idx: int | None = None,
                    noise_mode: str = "const", batch: int = 16, device="cpu") -> torch.Tensor:
    """uint8 images ``[len(seeds), C, H, W]``."""
    from batikfast.metrics.compute import to_uint8

    check_truncation(truncation_psi)
    if G.c_dim and class_idx is None:
        raise ValueError(f"this generator is conditional ({G.c_dim} classes): pass --class")
    if not G.c_dim and class_idx is not None:
        # it would be ignored: the images would not be of the class asked for
        raise ValueError(f"--class {class_idx} was given but this generator is unconditional "
                         "(trained without labels): leave --class out")
    z = latents(seeds, G.z_dim)
    c = torch.zeros([len(seeds), G.c_dim])
    if G.c_dim:
        if not 0 <= class_idx < G.c_dim:
            raise ValueError(f"--class must be in [0, {G.c_dim}), got {class_idx}")
        c[:, class_idx] = 1
    out = []
    for zb, cb in zip(z.split(batch), c.split(batch)):
        images = G(zb.to(device), cb.to(device), truncation_psi=truncation_psi,
                   noise_mode=noise_mode)
        out.append(to_uint8(images).cpu())
    return torch.cat(out)


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
        images = generate_images(G, seeds, args.trunc, args.class_idx, args.noise_mode,
                                 device=device)
        _write_images(args, seeds, images)
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


def _write_images(args, seeds, images) -> None:
    from PIL import Image

    from batikfast.training.rundir import save_image_grid

    if args.out:
        try:
            save_image_grid(images, args.out, args.columns)
        except OSError as error:
            raise ValueError(f"cannot write --out {args.out!r}: {error.strerror or error}") from None
        print(f"wrote a grid of {len(seeds)} images to {args.out}")
    if args.outdir:
        folder = Path(args.outdir)
        for seed, image in zip(seeds, images.numpy()):
            array = image.transpose(1, 2, 0)
            path = folder / f"seed{seed:04d}.png"
            try:
                Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)
            except OSError as error:
                raise ValueError(f"cannot write {str(path)!r} in --outdir: "
                                 f"{error.strerror or error}") from None
        print(f"wrote {len(seeds)} images to {folder}")


if __name__ == "__main__":
    sys.exit(main())
