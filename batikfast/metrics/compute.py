"""FID, KID and precision/recall of a generator against a dataset, on a given feature network.

    python -m batikfast.metrics --ckpt runs/x/checkpoint-00001000.pt --data builtin \
        --features inception-2015-12-05.pt --metrics fid,kid,pr --num-gen 10000
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from batikfast.metrics.features import FeatureExtractor, load_feature_network
from batikfast.metrics.stats import (feature_stats, frechet_distance, kernel_inception_distance,
                                     precision_recall)

METRICS = ("fid", "kid", "pr")
PR_K = 3  # neighbours of precision / recall: each set needs more samples than this


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8, rounded as NVIDIA's metrics and image grids do."""
    return (images.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def dataset_features(dataset, extractor: FeatureExtractor, num: int | None = None,
                     batch: int = 64, seed: int = 0) -> np.ndarray:
    """Features of ``num`` items of ``dataset`` (all when None or fewer), float64 ``[N, D]``.

    Fewer than all are a subset drawn with ``seed`` (read in dataset order), not the first
    ``num``: a folder is sorted by name, so its first items may all be one class or one shoot.
    """
    indices = np.arange(len(dataset))
    if num is not None and num < len(dataset):
        indices = np.sort(np.random.default_rng(seed).choice(len(dataset), num, replace=False))
    chunks = []
    for start in range(0, len(indices), batch):
        images = np.stack([dataset[int(i)][0] for i in indices[start:start + batch]])
        chunks.append(extractor(torch.from_numpy(images)).cpu().double().numpy())
    return np.concatenate(chunks)


@torch.no_grad()
def generator_features(G, extractor: FeatureExtractor, num: int, batch: int = 64,
                       truncation_psi: float = 1.0, seed: int = 0, labels=None,
                       device="cpu") -> np.ndarray:
    """Features of ``num`` images from ``G`` with latents drawn from ``seed``.

    As NVIDIA's metrics sample it: ``G`` in eval mode (so a generator left in training mode does
    not move its ``w_avg``), per-pixel noise drawn afresh for each image (``noise_mode="random"``,
    the generator's own distribution; "const" would give every image the same noise), and for a
    conditional generator the label of a uniformly drawn dataset item (``labels`` float32
    ``[M, c_dim]``). The noise comes from ``seed`` too, in a forked RNG: the same call gives the
    same features, and the caller's (training's) random state is left as it was.
    """
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    was_training = G.training
    forked = []
    if device.type == "cuda":
        forked = [torch.cuda.current_device() if device.index is None else device.index]
    chunks = []
    try:
        G.eval()
        with torch.random.fork_rng(devices=forked):
            torch.random.default_generator.manual_seed(seed)
            if forked:
                torch.cuda.default_generators[forked[0]].manual_seed(seed)
            for start in range(0, num, batch):
                n = min(batch, num - start)
                z = torch.randn([n, G.z_dim], generator=generator).to(device)
                if G.c_dim:
                    pick = torch.randint(len(labels), [n], generator=generator)
                    c = torch.as_tensor(np.asarray(labels, dtype=np.float32))[pick].to(device)
                else:
                    c = torch.zeros([n, 0], device=device)
                images = G(z, c, truncation_psi=truncation_psi, noise_mode="random")
                chunks.append(extractor(to_uint8(images)).cpu().double().numpy())
    finally:
        G.train(was_training)
    return np.concatenate(chunks)


def metrics_from_features(real: np.ndarray, fake: np.ndarray, metrics=METRICS,
                          kid_subsets: int = 100, pr_k: int = PR_K) -> dict[str, float]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics must be among {METRICS}, got {unknown}")
    result = {}
    if "fid" in metrics:
        result["fid"] = frechet_distance(*feature_stats(real), *feature_stats(fake))
    if "kid" in metrics:
        result["kid"] = kernel_inception_distance(real, fake, num_subsets=kid_subsets)
    if "pr" in metrics:
        result["precision"], result["recall"] = precision_recall(real, fake, k=pr_k)
    return result


def real_count(dataset, num_real: int | None) -> int:
    """How many dataset images the metrics use: ``num_real``, or all when None or fewer."""
    return len(dataset) if num_real is None else min(num_real, len(dataset))


def check_sample_counts(metrics, num_gen: int, num_real: int) -> None:
    """Before any feature is extracted: FID's covariances and KID's subsets need two samples of
    each set, precision/recall more than ``PR_K``."""
    for name, count in (("generated", num_gen), ("dataset", num_real)):
        if count < 2:
            raise ValueError(f"the metrics need at least 2 {name} images, got {count}")
        if "pr" in metrics and count <= PR_K:
            raise ValueError(f"precision/recall (k={PR_K}) needs more than {PR_K} {name} "
                             f"images, got {count}")


def dataset_labels(G, dataset) -> np.ndarray | None:
    """The labels that conditional ``G``'s images are drawn with (None when unconditional):
    one per dataset item, so classes come as often as in the data."""
    if not G.c_dim:
        return None
    labels = np.asarray(dataset.label_table(), dtype=np.float32)
    if labels.ndim != 2 or labels.shape[1] != G.c_dim:
        raise ValueError(f"the generator is conditional on {G.c_dim} classes but the dataset's "
                         f"labels have {labels.shape[1] if labels.ndim == 2 else 0}")
    return labels


def compute_metrics(G, dataset, extractor: FeatureExtractor, metrics=METRICS,
                    num_gen: int = 10000, num_real: int | None = None, batch: int = 64,
                    truncation_psi: float = 1.0, seed: int = 0, device="cpu",
                    real_cache: dict | None = None) -> dict[str, float]:
    """Metrics of ``G`` against ``dataset``. ``real_cache`` (a dict) keeps the real features
    between calls, so periodic evaluation during training computes them once.

    The cache is keyed by the dataset object, the feature network object and ``num_real``: a
    name and a length do not tell two datasets apart (the builtin one with another seed, two
    folders called ``data``), nor say which network the features came from. Each entry holds
    the two objects, so their ids are not reused while it exists.
    """
    check_sample_counts(metrics, num_gen, real_count(dataset, num_real))
    labels = dataset_labels(G, dataset)
    key = (id(dataset), id(extractor), num_real)
    entry = real_cache.get(key) if real_cache is not None else None
    if entry is not None and entry[0] is dataset and entry[1] is extractor:
        real = entry[2]
    else:
        real = dataset_features(dataset, extractor, num_real, batch)
        if real_cache is not None:
            real_cache[key] = (dataset, extractor, real)
    fake = generator_features(G, extractor, num_gen, batch, truncation_psi, seed, labels, device)
    return metrics_from_features(real, fake, metrics)


def main(argv=None) -> int:
    from batikfast.data import open_dataset
    from batikfast.generate import check_truncation
    from batikfast.training.checkpoint import CheckpointError, load_generator
    from batikfast.training.distributed import check_device

    parser = argparse.ArgumentParser(description="FID / KID / precision-recall of a checkpoint")
    parser.add_argument("--ckpt", required=True, help="batikfast checkpoint")
    parser.add_argument("--data", default=None,
                        help="folder, zip or 'builtin' (default: the run's training data)")
    parser.add_argument("--features", required=True,
                        help="feature network file (TorchScript InceptionV3 or SmallFeatureNet)")
    parser.add_argument("--metrics", default="fid,kid,pr")
    parser.add_argument("--num-gen", type=int, default=10000)
    parser.add_argument("--num-real", type=int, default=None)
    parser.add_argument("--trunc", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto",
                        help="auto (the GPU when there is one) | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    metrics = tuple(m for m in args.metrics.split(",") if m)
    try:
        # everything that can be wrong is found before the (long) feature extraction
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"--metrics must be a comma list of {METRICS}, got {args.metrics!r}")
        for option, count in (("--num-gen", args.num_gen), ("--num-real", args.num_real)):
            # FID's covariances and KID's subsets need two samples at least
            if count is not None and count < 2:
                raise ValueError(f"{option} must be at least 2, got {count}")
        counts = [n for n in (args.num_gen, args.num_real) if n is not None]
        if "pr" in metrics and min(counts) <= PR_K:
            raise ValueError(f"precision/recall (k={PR_K}) needs --num-gen and --num-real "
                             f"above {PR_K}")
        if args.batch < 1:
            raise ValueError(f"--batch must be at least 1, got {args.batch}")
        check_truncation(args.trunc)
        args.device = check_device(args.device)
        G, config = load_generator(args.ckpt, device=args.device)
        # the run's own data, x-flips included as training measured it; --data as it is
        dataset = open_dataset(args.data or config.get("data", "builtin"),
                               resolution=G.img_resolution, use_labels=bool(G.c_dim),
                               xflip=not args.data and bool(config.get("mirror", False)),
                               seed=config.get("data_seed", 0), size=config.get("data_size", 20000))
        num_real = real_count(dataset, args.num_real)
        check_sample_counts(metrics, args.num_gen, num_real)
        dataset_labels(G, dataset)
        extractor = load_feature_network(args.features, args.device)
    except (ValueError, OSError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.num_real is not None and num_real < args.num_real:
        print(f"warning: --num-real {args.num_real} but the dataset has {num_real} images; "
              f"using all {num_real}", file=sys.stderr)
    result = compute_metrics(G, dataset, extractor, metrics, args.num_gen, args.num_real,
                             args.batch, args.trunc, device=args.device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
