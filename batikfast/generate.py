"""Generate batik images from a checkpoint's EMA generator.

    python -m batikfast.generate --ckpt runs/demo/checkpoint-00000025.pt --seeds 0-63 \
        --trunc 0.7 --out grid.png
    python -m batikfast.generate --ckpt ... --seeds 1,5,9 --outdir images/   # one PNG per seed

Seed ``s`` always gives the same latent (``z ~ N(0, I)`` from ``numpy.random.RandomState(s)``, as
NVIDIA's generate.py draws it), so images can be regenerated one at a time.
"""
from __future__ import annotations

import argparse
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


def latents(seeds, z_dim: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.random.RandomState(s % 2**32).randn(z_dim)
                                      for s in seeds])).float()


@torch.no_grad()
def generate_images(G, seeds, truncation_psi: float = 1.0, class_idx: int | None = None,
                    noise_mode: str = "const", batch: int = 16, device="cpu") -> torch.Tensor:
    """uint8 images ``[len(seeds), C, H, W]``."""
    from batikfast.metrics.compute import to_uint8

    if G.c_dim and class_idx is None:
        raise ValueError(f"this generator is conditional ({G.c_dim} classes): pass --class")
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
    from batikfast.training.rundir import save_image_grid

    parser = argparse.ArgumentParser(description="Generate images from a batikfast checkpoint")
    parser.add_argument("--ckpt", required=True, help="checkpoint file (checkpoint-*.pt)")
    parser.add_argument("--seeds", default="0-15", help="e.g. 0-63 or 1,5,9")
    parser.add_argument("--trunc", type=float, default=1.0, help="truncation psi")
    parser.add_argument("--class", dest="class_idx", type=int, default=None)
    parser.add_argument("--noise-mode", default="const", choices=["const", "random", "none"])
    parser.add_argument("--out", default=None, help="write one grid PNG here")
    parser.add_argument("--outdir", default=None, help="write one PNG per seed here")
    parser.add_argument("--columns", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.out and not args.outdir:
        args.out = "grid.png"
    try:
        seeds = parse_seeds(args.seeds)
        G, _ = load_generator(args.ckpt, device=args.device)
        images = generate_images(G, seeds, args.trunc, args.class_idx, args.noise_mode,
                                 device=args.device)
    except (ValueError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(images, args.out, args.columns)
        print(f"wrote a grid of {len(seeds)} images to {args.out}")
    if args.outdir:
        from PIL import Image

        folder = Path(args.outdir)
        folder.mkdir(parents=True, exist_ok=True)
        for seed, image in zip(seeds, images.numpy()):
            array = image.transpose(1, 2, 0)
            Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(
                folder / f"seed{seed:04d}.png")
        print(f"wrote {len(seeds)} images to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
