"""Train a Diffusion-GAN (StyleGAN2-ADA generator, t-conditioned discriminator) on batik motifs.

Single process:      python train.py --outdir runs/demo --cfg tiny --kimg 0.2
Several GPUs:        torchrun --nproc_per_node=8 train.py --outdir runs/batik --data batik.zip
Continue a run:      python train.py --outdir runs/demo --cfg tiny --kimg 1 --resume auto

The output folder holds training_options.json, log.txt, stats.jsonl (and TensorBoard scalars when
tensorboard is installed), reals.png, fakes*.png grids from the EMA generator, and atomically
written, checksummed checkpoints (checkpoint-<step>.pt). ``--resume auto`` continues from the
newest valid checkpoint in --outdir (a fresh start when there is none); the run's saved
configuration is kept, except for options given on the command line that do not change the model
or the maths (kimg, snap, workers, compile, backend, ...), and --data, where the run's images
are now (a dataset moved since). Defaults follow the batik paper (--cfg paper256).
"""
from __future__ import annotations

import argparse
import os
import sys


RANK_FAILURE = 1  # exit status when another rank died or hung (RankFailure)


def _bool_flag(parser, name: str, help: str, default=None) -> None:
    group = parser.add_mutually_exclusive_group()
    dest = name.replace("-", "_")
    group.add_argument(f"--{name}", dest=dest, action="store_true", help=help)
    group.add_argument(f"--no-{name}", dest=dest, action="store_false")
    parser.set_defaults(**{dest: default})


def build_parser() -> argparse.ArgumentParser:
    from batikfast.training.config import CHOICES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--outdir", required=True, help="run folder (created; holds checkpoints)")
    p.add_argument("--data", default=None, help="image folder, zip archive, or 'builtin' "
                   "(procedural batik motifs, the default)")
    p.add_argument("--cfg", default="paper256", choices=CHOICES["cfg"], help="preset (default paper256)")
    p.add_argument("--kimg", type=float, default=None, help="train for this many thousand images")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint in --outdir) or a path")
    p.add_argument("--init", default=None, help="start from these weights (a batikfast checkpoint "
                   "or an NVIDIA StyleGAN2-ADA / Diffusion-GAN .pkl), matched by name and shape")
    p.add_argument("--loss", choices=CHOICES["loss"], default=None)
    p.add_argument("--aug", choices=CHOICES["aug"], default=None,
                   help="no | ada (adaptive augmentation) | diff (DiffAugment)")
    p.add_argument("--ts-dist", choices=CHOICES["ts_dist"], default=None)
    _bool_flag(p, "diffusion", "noise the discriminator's inputs (Diffusion-GAN; default on)")
    p.add_argument("--backend", choices=CHOICES["backend"], default=None)
    _bool_flag(p, "compile", "torch.compile the training phases, R1 and path length through "
               "torch.func; one that fails to compile runs eagerly and the log says so "
               "(default: on for GPUs)")
    _bool_flag(p, "cudagraphs", "with --compile on a GPU, run the main phases as CUDA graphs "
               "(torch.compile mode 'reduce-overhead'; default off)")
    p.add_argument("--precision", choices=CHOICES["precision"], default=None)
    p.add_argument("--batch", type=int, default=None, help="global batch size")
    p.add_argument("--batch-gpu", type=int, default=None, help="images per GPU per round")
    p.add_argument("--snap", type=int, default=None, help="checkpoint every this many ticks")
    p.add_argument("--image-snap", type=int, default=None, help="image grid every this many ticks")
    p.add_argument("--tick", type=float, default=None, dest="tick_kimg", help="kimg per progress line")
    _bool_flag(p, "deterministic", "deterministic algorithms (slower on GPUs)")
    _bool_flag(p, "mirror", "x-flip the dataset")
    _bool_flag(p, "cond", "condition on dataset labels")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--glr", type=float, default=None)
    p.add_argument("--dlr", type=float, default=None)
    p.add_argument("--gamma", type=float, default=None, dest="r1_gamma", help="R1 weight")
    p.add_argument("--target", type=float, default=None, dest="diffusion_target")
    p.add_argument("--workers", type=int, default=None, help="data loader processes per GPU")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (one process)")
    p.add_argument("--metrics", default=None, help="comma list of fid,kid,pr at each checkpoint")
    p.add_argument("--metrics-features", default=None, help="feature network file for --metrics")
    p.add_argument("--metrics-num", type=int, default=None, help="images generated (and real "
                   "images read, at most the dataset's) per evaluation (default 10000)")
    p.add_argument("--ddp-timeout", type=float, default=None, dest="ddp_timeout_s",
                   metavar="SECONDS", help="under torchrun, how long a rank waits for the others "
                   "in a collective before it gives up with an error naming it (default 600)")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args) -> dict:
    from batikfast.training.config import make_config, split_batch
    from batikfast.training.distributed import check_device

    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("outdir", "cfg", "resume", "metrics")}
    if args.metrics:
        overrides["metrics"] = [m for m in args.metrics.split(",") if m]
        if not args.metrics_features:
            raise ValueError("--metrics needs --metrics-features (a feature network file; "
                             "batikfast never downloads one)")
    config = make_config(args.cfg, **overrides)
    # A GPU asked for where there is none: one line, not a traceback.
    check_backend(config["backend"], check_device(config["device"]))
    # Under torchrun, a batch that does not split over the ranks is an error before any
    # process group starts, not a traceback from every rank. A resumed run keeps its
    # checkpoint's batch: that one is checked once the checkpoint is read.
    if not args.resume:
        split_batch(config, int(os.environ.get("WORLD_SIZE", "1")))
    if config["compile"] is None:
        config["compile"] = False if config["device"] == "cpu" else None
    if config["cudagraphs"]:
        import torch

        device = config["device"]
        if not (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())):
            where = "this machine has no CUDA GPU" if device == "auto" else f"--device {device}"
            raise ValueError(f"--cudagraphs needs a CUDA GPU (CUDA graphs), but {where}")
    return config


def check_backend(backend: str, device: str) -> None:
    """``--backend`` (or, under ``auto``, ``BATIKFAST_BACKEND``) that cannot run on the run's
    device: one line at startup, not a traceback from the first image grid after the run folder
    was made."""
    import torch

    from batikfast import backends

    forced = backends.get_backend() if backend == "auto" else backend  # names a bad variable
    if forced is None:
        return
    reason = backends.unavailable_reason(forced, torch.device(device), torch.float32)
    if reason is not None:
        source = f"--backend {forced}" if backend != "auto" else f"BATIKFAST_BACKEND={forced}"
        raise ValueError(f"{source} cannot run on {device}: {reason} (--backend ref or auto "
                         "runs anywhere; python -m batikfast.info lists what runs here)")


def given_options(args) -> set[str]:
    """The training options set on the command line: on ``--resume`` only these run-time
    options replace the checkpoint's (the preset's defaults are not the run's)."""
    given = {k for k, v in vars(args).items()
             if v is not None and k not in ("outdir", "cfg", "resume")}
    if "device" in given:
        given.add("compile")  # its default follows the device
    return given


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from batikfast.training.loop import TrainingDiverged, train
    from batikfast.training.distributed import RankFailure
    from batikfast.training.rundir import OutputDirError
    from batikfast.training.checkpoint import CheckpointError
    from batikfast.data import DatasetError
    from batikfast.metrics import FeatureNetworkError
    from batikfast.training.config import ConfigError

    try:
        train(config, args.outdir, resume=args.resume, given=given_options(args))
    except (OutputDirError, DatasetError, CheckpointError, FeatureNetworkError,
            ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except RankFailure as error:  # another rank died or hung: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return RANK_FAILURE
    return 0  # also after SIGTERM/SIGINT: the checkpoint is saved, --resume auto continues


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    status = main()
    if status == RANK_FAILURE:
        # Leave without Python's teardown: destroying a process group whose peer hung makes
        # gloo's worker thread call std::terminate (SIGABRT: exit -6 and a core dump after
        # the error line instead of exit 1; seen with a stopped rank and --ddp-timeout 5).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
