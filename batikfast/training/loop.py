"""The Diffusion-GAN training loop (StyleGAN2-ADA's, with the Diffusion-GAN discriminator input).

One step consumes ``batch`` real images and runs the four StyleGAN2 phases with lazy
regularisation: ``Gmain`` every step, ``Greg`` (path length) every ``g_reg_interval`` steps,
``Dmain`` every step and ``Dreg`` (R1) every ``d_reg_interval`` steps. The main phases' Adam
optimisers get ``lr * r`` and ``betas ** r`` with ``r = interval / (interval + 1)`` (NVIDIA's
correction for the regularisation steps that share them), and the regularisation losses are
scaled by their interval. Each rank runs ``rounds`` rounds of ``batch_gpu`` images and
accumulates; the gradients are all-reduced and averaged, so one step optimises the mean loss of
the global batch whatever the number of GPUs and rounds.

Randomness: latents and conditioning labels for the whole global batch come from one generator
shared by all ranks, each rank taking its slice, so they do not depend on the number of GPUs; the
real images come from the rank-sharded stream of :mod:`batikfast.data.loader`. Everything else
(noise inputs, diffusion t and noise, augmentations) uses each rank's global torch RNG.

Faults: a non-finite gradient skips the optimiser step of that phase (logged with phase and
step); ``max_nan_skips`` consecutive bad steps stop the run without writing a checkpoint, so
the last good one stays. SIGTERM and SIGINT finish the current step, save a checkpoint and exit.
The skip is decided on the device (fused Adam's ``found_inf``, GradScaler's kernels for the
loss scale), so a step never waits for the GPU: the host reads the skip flags every
``adjust_interval`` steps, when the adaptive diffusion / augmentation update reads its
statistics anyway, at every tick and before every checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from batikfast.data import DatasetError, make_loader, open_dataset
from batikfast.metrics.compute import to_uint8
from batikfast.training import checkpoint as ckpt
from batikfast.training import distributed as dist_utils
from batikfast.training import rundir
from batikfast.training.config import ConfigError, network_kwargs, split_batch
from batikfast.training.ema import ema_beta, update_ema
from batikfast.training.model import build_networks, build_training_objects

RUNTIME_KEYS = ("kimg", "snap", "image_snap", "tick_kimg", "workers", "compile", "cudagraphs",
                "backend", "keep_checkpoints", "metrics", "metrics_features", "metrics_num",
                "device", "ddp_timeout_s", "max_nan_skips", "deterministic", "batch_gpu",
                "stop_after_steps", "data")


# (statistic, label) shown on each progress line; stats.jsonl and TensorBoard get all of them.
TICK_FIELDS = (("Loss/G/loss", "G"), ("Loss/D/loss", "D"), ("Loss/pl_penalty", "pl"),
               ("Loss/r1_penalty", "r1"), ("Loss/signs/real", "sign"), ("Diffusion/T", "T"),
               ("Diffusion/p", "p"), ("Augment/p", "augp"))


_PARENT_AT_IMPORT = os.getppid()  # see Trainer._launcher_pid


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""


@dataclass
class Phase:
    name: str
    module: torch.nn.Module
    opt: torch.optim.Optimizer
    interval: int
    found_inf: torch.Tensor | None = None  # the last step's skip flag (0-d, on the device)


class LossScaler:
    """Dynamic loss scaling for fp16 (what GradScaler does, applied through the loss gain).

    The loss object runs ``backward`` itself with a ``gain``; multiplying the gain by the scale
    and dividing the reduced gradients by it is exactly GradScaler's scale/unscale. The scale
    and its count of good steps live on the device and are updated there by GradScaler's own
    kernel, so backing off after an overflow needs no host sync.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 12, growth_interval: int = 1000,
                 device: torch.device | str = "cpu"):
        self.enabled = enabled
        self.growth_interval = growth_interval
        self.scale = torch.full((), init_scale if enabled else 1.0, dtype=torch.float32,
                                device=device)
        self._good_steps = torch.zeros((), dtype=torch.int32, device=device)

    def loss_gain(self, gain: float) -> float | torch.Tensor:
        """``gain`` times the scale: a device scalar when scaling, else the plain number."""
        return gain * self.scale if self.enabled else gain

    def unscale_and_check_(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Divide ``grads`` by the scale in place; returns 1.0 (a 0-d device tensor) if any
        element is inf or NaN, else 0.0. Grads are grouped by dtype for the fused kernel."""
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        inv_scale = self.scale.reciprocal()  # 1 when scaling is off
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
        return found_inf

    def update(self, found_inf: torch.Tensor) -> torch.Tensor:
        """Back off (halve) after an overflow, double after ``growth_interval`` good steps.
        Returns 1.0 where ``found_inf`` is a fault that scaling cannot cure: always without
        scaling, and with it once backing off has taken the scale below 1."""
        if not self.enabled:
            return found_inf
        torch._amp_update_scale_(self.scale, self._good_steps, found_inf, 2.0, 0.5,
                                 self.growth_interval)
        return found_inf * (self.scale < 1.0)

    def state_dict(self) -> dict:
        return {"scale": float(self.scale), "good_steps": int(self._good_steps)}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled:
            self.scale.fill_(float(state["scale"]))
            self._good_steps.fill_(int(state["good_steps"]))


class Trainer:
    def __init__(self, config: dict, outdir, info: dist_utils.DistInfo, log=None,
                 resuming: bool = False):
        self.config = config
        self.outdir = Path(outdir)
        self.info = info
        self.device = info.device
        owns_logger = log is None
        self.logger = rundir.RunLogger(self.outdir, enabled=info.is_main) if owns_logger else log
        self.stop_signal: str | None = None
        self.cur_nimg = 0
        self.step = 0
        self.tick = 0
        self.nan_streak = 0
        # (step, kimg, phase names, 0-d fault flags on the device) not yet read by the host
        self._unreported_faults: list[tuple[int, float, list[str], list[torch.Tensor]]] = []
        self.last_checkpoint: Path | None = None
        try:
            self._set_up(resuming)
        except BaseException:
            if owns_logger:  # a run refused at its setup leaves no file or writer open
                self.logger.close()
            raise

    def _set_up(self, resuming: bool) -> None:
        """Data, networks, optimisers and the checks that stop a run before it trains."""
        config, info = self.config, self.info
        self._setup_determinism()
        import batikfast

        batikfast.set_backend(None if config["backend"] == "auto" else config["backend"])
        self._seed(config["seed"])  # the same on every rank: identical initial networks
        self.batch_gpu, self.rounds = split_batch(config, info.world_size)
        self.batch = config["batch"]

        self.dataset = self._open_dataset_logging_its_warnings()
        if self.dataset.resolution != config["resolution"]:
            raise DatasetError(f"the dataset is {self.dataset.resolution}x{self.dataset.resolution} "
                             f"but --cfg {config['cfg']} trains at {config['resolution']}")
        self._check_stored_resolution()
        self._check_metrics_sample_counts()
        c_dim = self.dataset.label_dim
        self.G_kwargs, self.D_kwargs = network_kwargs(config, c_dim, self.dataset.num_channels)
        config["G_kwargs"], config["D_kwargs"] = self.G_kwargs, self.D_kwargs
        self.G, self.D = build_networks(self.G_kwargs, self.D_kwargs, self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        # A resumed run's weights come from its checkpoint: its --init file is not read again
        # (it may be gone since, or absent on this node, and an NVIDIA pickle is slow to read).
        if config.get("init") and not resuming:
            self._init_from(config["init"])
        self._broadcast_networks()
        self._seed(config["seed"] * info.world_size + info.rank)
        self._check_space_for_checkpoints()
        self._extractor, self._real_cache = self._load_feature_network(), {}
        self.parts = build_training_objects(config, self.G, self.D, self.device, info.rank,
                                            self.log)
        self.phases = self._make_phases()
        self.scaler = LossScaler(config["precision"] == "fp16" and self.device.type == "cuda",
                                 device=self.device)
        self.latent_gen = torch.Generator().manual_seed(config["seed"])
        self.labels = self._label_table() if c_dim else None
        # seeds 0..n-1 drawn as batikfast.generate draws them: `--seeds 0-15` redraws the grid
        from batikfast.generate import latents

        self.grid_z = latents(range(config["grid_seeds"]), self.G.z_dim)
        self.grid_c = self._grid_labels()

    # ---- setup ---------------------------------------------------------------------------
    def _check_stored_resolution(self) -> None:
        """An archive of smaller images would be upscaled at every read, which no run wants
        (a 128x128 archive trained by the default paper256 preset, say): an error saying which
        --resolution fits. Larger images are resized down, and the log says so once."""
        stored = getattr(self.dataset, "stored_resolution", None)
        resolution = self.config["resolution"]
        if stored is None or stored == resolution:
            return
        if stored < resolution:
            fits = 1 << (stored.bit_length() - 1)  # the largest power of two <= stored
            raise DatasetError(
                f"the images of {self.config['data']!r} are {stored}x{stored} but the run trains "
                f"at {resolution}x{resolution} (--resolution, --cfg {self.config['cfg']}), which "
                f"would upscale every image: pass --resolution {fits}")
        self.log(f"the dataset's images are {stored}x{stored}, resized to {resolution}x"
                 f"{resolution} at every read (tools/make_dataset.py --resolution {resolution} "
                 "stores them at that size once)")

    def _check_metrics_sample_counts(self) -> None:
        """The metrics read at most ``metrics_num`` dataset images, all of them when it has
        fewer: a dataset too small for a metric stops the run now, not with a traceback at its
        first checkpoint, hours later. Every rank opened the same dataset, so every rank
        raises alike. One smaller than metrics_num but large enough is said once, as
        ``python -m batikfast.metrics`` warns about --num-real."""
        metrics, num = self.config["metrics"], self.config["metrics_num"]
        if not metrics:
            return
        from batikfast.metrics.compute import check_sample_counts, real_count

        size = len(self.dataset)
        flips = " (x-flips included)" if self.dataset.xflip else ""
        try:
            check_sample_counts(metrics, num, real_count(self.dataset, num))
        except ValueError as error:
            raise ConfigError(
                f"--metrics {','.join(metrics)} cannot be evaluated on the {size} images"
                f"{flips} of {self.config['data']!r}: {error} (a larger dataset, or leave that "
                "metric out of --metrics)") from error
        if size < num:
            self.log(f"metrics: --metrics-num {num} but the dataset has {size} images{flips}; "
                     f"each evaluation uses all {size} and {num} generated images")

    def log(self, message: str) -> None:
        self.logger.print(message)

    def _open_dataset_logging_its_warnings(self):
        """The dataset, with what its scan skipped or converted (each named) written to the
        log: log.txt must say which files a run left out, and rank 0 says it once rather than
        every rank on stderr. (Loader workers append theirs: make_loader's warning_log.)"""
        config = self.config
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = open_dataset(config["data"], resolution=config["resolution"],
                                   xflip=config["mirror"], use_labels=config["cond"],
                                   seed=config["data_seed"], size=config["data_size"])
        for warning in caught:
            self.log(f"warning: {warning.message}")
        return dataset

    def _setup_determinism(self) -> None:
        deterministic = self.config["deterministic"]
        torch.backends.cudnn.benchmark = not deterministic
        # TF32 off as in NVIDIA's code: it changes GAN dynamics measurably.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(deterministic, warn_only=True)

    # What torch.save adds per tensor (its zip record: about 350 bytes on torch 2.14), and
    # per rank (its RNG states, torch's, numpy's and Python's, about 15 kB; the config).
    TENSOR_RECORD_BYTES = 400
    RANK_STATE_BYTES = 32 << 10

    def checkpoint_bytes(self) -> int:
        """The size of one checkpoint once Adam has its moments, or a little more (measured:
        18% more for the tests' micro networks, 2.5% for tiny, 0.04% for smoke): G, D and
        G_ema with their buffers, Adam's step and two moments of each parameter of G and D, a
        record per tensor, and each rank's own state."""
        tensors = [t for net in (self.G, self.D, self.G_ema) for t in net.state_dict().values()]
        params = [p for net in (self.G, self.D) for p in net.parameters()]
        data = sum(t.numel() * t.element_size() for t in tensors + params + params)
        records = len(tensors) + 3 * len(params)
        return (data + records * self.TENSOR_RECORD_BYTES
                + self.info.world_size * self.RANK_STATE_BYTES)

    def _check_space_for_checkpoints(self) -> None:
        error = None
        if self.info.is_main:
            # the new checkpoint is complete before the previous one goes: room for two,
            # and the writer's margin
            need = 2 * self.checkpoint_bytes() + ckpt.SPACE_MARGIN
            try:
                rundir.check_output_dir(self.outdir, need_bytes=need)
            except rundir.OutputDirError as err:
                error = str(err)
        error = dist_utils.broadcast_object(error, self.info, "output folder check")
        if error:  # every rank stops, none waits for the others
            raise rundir.OutputDirError(error)

    def _load_feature_network(self):
        """The metrics' feature network (rank 0), loaded before training: a bad file stops the
        run now rather than at its first checkpoint."""
        if not self.config["metrics"]:
            return None
        from batikfast.metrics import FeatureNetworkError, load_feature_network

        extractor, error = None, None
        if self.info.is_main:
            try:
                extractor = load_feature_network(self.config["metrics_features"], self.device)
            except (OSError, ValueError, RuntimeError) as err:
                error = f"metrics_features: {err}"
        error = dist_utils.broadcast_object(error, self.info, "feature network check")
        if error:  # every rank stops, none waits for the others
            raise FeatureNetworkError(error)
        return extractor

    def _init_from(self, path: str) -> None:
        """Start from the weights of a batikfast checkpoint or an NVIDIA StyleGAN2-ADA /
        Diffusion-GAN pickle (the batik paper fine-tuned from one), matched by name and shape."""
        if str(path).endswith(".pkl"):
            from batikfast.networks import load_nvidia

            snapshot = load_nvidia(path)
            sources = {k: snapshot[k].state_dict() for k in ("G", "D", "G_ema")
                       if isinstance(snapshot, dict) and hasattr(snapshot.get(k), "state_dict")}
        else:
            state = ckpt.load_checkpoint(path)
            sources = {k: state[k] for k in ("G", "D", "G_ema") if k in state}
        if "G_ema" not in sources and "G" in sources:
            sources["G_ema"] = sources["G"]
        for name, module in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema)):
            source = sources.get(name, {})
            target = module.state_dict()
            matched = {k: v for k, v in source.items()
                       if k in target and tuple(v.shape) == tuple(target[k].shape)}
            with torch.no_grad():
                for key, value in matched.items():
                    target[key].copy_(value)
            self.log(f"init {name} from {path}: {len(matched)} of {len(target)} tensors copied"
                     + ("" if len(matched) == len(target) else
                        f"; the other {len(target) - len(matched)} keep their initialisation"))

    def _broadcast_networks(self) -> None:
        # Rank 0's weights everywhere, whatever the initialisers did (NVIDIA does the same).
        if not self.info.distributed:
            return
        for module in (self.G, self.D, self.G_ema):
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist_utils.broadcast_(tensor.data, self.info, what="initial weights broadcast")

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _make_phases(self) -> list[Phase]:
        cfg = self.config
        phases = []
        for name, module, lr, interval in (("G", self.G, cfg["glr"], cfg["g_reg_interval"]),
                                           ("D", self.D, cfg["dlr"], cfg["d_reg_interval"])):
            betas = (0.0, 0.99)
            if interval:
                ratio = interval / (interval + 1)
                lr, betas = lr * ratio, tuple(b ** ratio for b in betas)
            # Fused: one kernel for all parameters instead of a dozen foreach launches, and
            # the only Adam that can skip a step on the device (found_inf).
            opt = torch.optim.Adam(module.parameters(), lr=lr, betas=betas, eps=1e-8, fused=True)
            if interval:
                phases += [Phase(name + "main", module, opt, 1), Phase(name + "reg", module, opt, interval)]
            else:
                phases += [Phase(name + "both", module, opt, 1)]
        return phases

    def _label_table(self) -> torch.Tensor:
        return torch.from_numpy(self.dataset.label_table())

    def _grid_labels(self) -> torch.Tensor:
        n = self.grid_z.shape[0]
        if self.labels is None:
            return torch.zeros([n, 0])
        return self.labels[torch.arange(n) % len(self.labels)]

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        ranks = dist_utils.all_gather_objects((ckpt.capture_rng_state(), self._rank_state()),
                                              self.info, "per-rank state gather")
        rng, rank_state = [r for r, _ in ranks], [s for _, s in ranks]
        return {
            "format": "batikfast-checkpoint", "version": 1,
            "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
            "G_opt": self._opt("G").state_dict(), "D_opt": self._opt("D").state_dict(),
            "training": self.parts.state_dict(),
            "scaler": self.scaler.state_dict(),
            "latent_gen": self.latent_gen.get_state(),
            "rng": rng,
            "rank_state": rank_state,
            # the streak too: resumed at 0, a run that keeps diverging around its
            # checkpoints would never reach max_nan_skips
            "progress": {"cur_nimg": self.cur_nimg, "step": self.step, "tick": self.tick,
                         "nan_streak": self.nan_streak, "world_size": self.info.world_size},
            "config": json.loads(json.dumps(self.config)),
        }

    def _rank_state(self) -> dict:
        """What each rank holds for itself beyond its RNG: the running means that its own
        forward passes update (G's w_avg, the path-length mean; NVIDIA's DDP does not sync them
        either) and its share of the adaptive-p statistics since the last update. The rest of
        a checkpoint is rank 0's; these differ between ranks, and a resumed rank that took rank
        0's would continue another run than the uninterrupted one."""
        w_avg = getattr(self.G.mapping, "w_avg", None)
        return {"w_avg": None if w_avg is None else w_avg.detach().cpu().clone(),
                "pl_mean": self.parts.reg_loss.pl_mean.detach().cpu().clone(),
                "signs": self.parts.sign_statistics()}

    def _load_rank_state(self, saved: list | None) -> None:
        """This rank's own part of a checkpoint (see _rank_state). On another number of
        processes, rank r takes the running means of saved rank r modulo their number, and
        rank 0 the sum of every saved rank's sign statistics (the others none), so the next
        all-reduced update of p sees exactly the signs the run had gathered."""
        if not saved:  # a checkpoint written before per-rank state was saved: rank 0's
            return
        same_world = len(saved) == self.info.world_size
        own = saved[self.info.rank % len(saved)]
        if own["w_avg"] is not None:
            for G in (self.G, self.G_ema):  # G_ema copies G's buffers at every step
                G.mapping.w_avg.copy_(own["w_avg"])
        self.parts.reg_loss.load_state_dict({"pl_mean": own["pl_mean"]})
        if same_world:
            signs = own["signs"]
        elif self.info.is_main:
            signs = {key: [sum(s["signs"][key][i] for s in saved) for i in (0, 1)]
                     for key in own["signs"]}
        else:
            signs = {key: [0.0, 0] for key in own["signs"]}
        self.parts.load_sign_statistics(signs)

    def _opt(self, which: str) -> torch.optim.Optimizer:
        return next(p.opt for p in self.phases if p.name.startswith(which))

    def load_state_dict(self, state: dict, source: str) -> None:
        try:
            self.G.load_state_dict(state["G"])
            self.D.load_state_dict(state["D"])
            self.G_ema.load_state_dict(state["G_ema"])
            self._opt("G").load_state_dict(state["G_opt"])
            self._opt("D").load_state_dict(state["D_opt"])
            self.parts.load_state_dict(state["training"])
            self.scaler.load_state_dict(state["scaler"])
            self.latent_gen.set_state(state["latent_gen"])
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            # weights that are not those of the networks its own config describes
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise ckpt.CorruptCheckpointError(
                f"{source} does not fit the networks of its own configuration "
                f"({type(error).__name__}: {' '.join(lines[:2])}); it cannot be resumed") \
                from error
        try:
            self._load_rank_state(state.get("rank_state"))
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
            raise ckpt.CorruptCheckpointError(
                f"{source} holds a per-rank state that does not fit ({type(error).__name__}: "
                f"{error}); it cannot be resumed") from error
        progress = state["progress"]
        self.cur_nimg, self.step, self.tick = (int(progress["cur_nimg"]), int(progress["step"]),
                                               int(progress["tick"]))
        self.nan_streak = int(progress.get("nan_streak", 0))  # older checkpoints lack it
        rng = state["rng"]
        if len(rng) == self.info.world_size:
            ckpt.restore_rng_state(rng[self.info.rank])
        else:
            self._seed((self.config["seed"] * 1000003 + self.step) * self.info.world_size
                       + self.info.rank)
            self.log(f"resuming on {self.info.world_size} processes from a checkpoint of "
                     f"{len(rng)}: per-rank RNG streams are reseeded (data order and latents "
                     "continue exactly)")
        self.log(f"resumed from {source} at kimg {self.cur_nimg / 1000:.3f} (step {self.step})")

    def save_checkpoint(self, final: bool = False) -> Path | None:
        """Write a checkpoint (rank 0). A failed write (full disk, say) keeps the previous one;
        training goes on and tries again at the next snapshot, unless this is the ``final``
        checkpoint of the run (end or signal), whose failure is raised. A run that has diverged
        since the last report raises TrainingDiverged here instead of saving."""
        self.report_faults()
        state = self.state_dict()  # collective: every rank takes part
        path, error = None, None
        if self.info.is_main:
            try:
                path = ckpt.save_checkpoint(state, self.outdir / ckpt.checkpoint_name(self.step))
                ckpt.prune_checkpoints(self.outdir, self.config["keep_checkpoints"])
                self.last_checkpoint = path
                self.log(f"checkpoint {path}")
            except ckpt.CheckpointError as err:
                error = str(err)
        error = dist_utils.broadcast_object(error, self.info, "checkpoint result")
        if error:
            if final:
                raise ckpt.CheckpointError(error)
            self.log(f"checkpoint not written: {error}; training continues and tries again at "
                     "the next snapshot")
        return path

    # ---- one step ------------------------------------------------------------------------
    def _rank_slice(self, tensor: torch.Tensor) -> torch.Tensor:
        # stream position r, r + W, ... of the global batch belongs to rank r (as the sampler)
        return tensor[self.info.rank::self.info.world_size]

    def _draw_latents(self):
        n_phases = len(self.phases)
        z = torch.randn([n_phases, self.batch, self.G.z_dim], generator=self.latent_gen)
        z = torch.stack([self._rank_slice(pz) for pz in z])
        if self.labels is not None:
            idx = torch.randint(len(self.labels), [n_phases, self.batch], generator=self.latent_gen)
            c = torch.stack([self._rank_slice(self.labels[pi]) for pi in idx])
        else:
            c = torch.zeros([n_phases, self.batch // self.info.world_size, 0])
        if self.device.type == "cuda":  # pinned: the copy does not hold up the host
            z, c = z.pin_memory(), c.pin_memory()
        z = z.to(self.device, non_blocking=True).split(self.batch_gpu, dim=1)
        c = c.to(self.device, non_blocking=True).split(self.batch_gpu, dim=1)
        return z, c

    def _next_reals(self, loader):
        images, labels = [], []
        for _ in range(self.rounds):
            img, lab = next(loader)
            images.append(img.to(self.device, non_blocking=True).to(torch.float32) / 127.5 - 1)
            labels.append(lab.to(self.device, non_blocking=True))
        return images, labels

    def train_step(self, loader) -> None:
        reals, real_cs = self._next_reals(loader)
        gen_z, gen_c = self._draw_latents()
        names, faults = [], []
        for index, phase in enumerate(self.phases):
            if self.step % phase.interval:
                continue
            running = self._running_statistics()
            phase.module.requires_grad_(True)
            phase.opt.zero_grad(set_to_none=True)
            gain = self.scaler.loss_gain(phase.interval / self.rounds)
            for r in range(self.rounds):
                self.parts.accumulate_gradients(
                    phase.name, real_img=reals[r], real_c=real_cs[r], gen_z=gen_z[r][index],
                    gen_c=gen_c[r][index], gain=gain)
            phase.module.requires_grad_(False)
            fault = self._reduce_and_step(phase)
            if fault is not None:
                self._keep_running_statistics_of_skipped_step(running, phase.found_inf)
                names.append(phase.name)
                faults.append(fault)
        self._after_step(names, faults)

    def _running_statistics(self) -> tuple:
        """What the forward passes themselves update, outside the optimiser: G's running mean
        of w (every phase that runs G's mapping) and the path-length mean (Greg)."""
        w_avg = getattr(self.G.mapping, "w_avg", None)
        return (None if w_avg is None else w_avg.clone(), self.parts.reg_loss.pl_mean)

    def _keep_running_statistics_of_skipped_step(self, running: tuple,
                                                 found_inf: torch.Tensor) -> None:
        """A non-finite forward pass also wrote NaN into w_avg / pl_mean: the optimiser step is
        skipped, but those stayed NaN for good (w_avg is copied into G_ema and every
        checkpoint, and breaks truncated sampling; a NaN pl_mean makes every later Greg
        non-finite, skipping path-length regularisation for the rest of the run). Restored
        on the device where the phase was skipped, without waiting for it."""
        w_avg, pl_mean = running
        skipped = found_inf > 0
        if w_avg is not None:
            now = self.G.mapping.w_avg
            now.copy_(torch.where(skipped, w_avg, now))
        reg_loss = self.parts.reg_loss
        if reg_loss.pl_mean is not pl_mean:
            reg_loss.pl_mean = torch.where(skipped.to(reg_loss.pl_mean.device),
                                           pl_mean.to(reg_loss.pl_mean.device),
                                           reg_loss.pl_mean)

    def _reduce_and_step(self, phase: Phase) -> torch.Tensor | None:
        """All-reduce, unscale and check the phase's gradients, and step its optimiser unless
        they are not finite, all without waiting for the device. Returns the phase's fault flag
        (a 0-d device tensor, see LossScaler.update), or None if the phase has no gradient."""
        params = [p for p in phase.module.parameters() if p.grad is not None and p.numel()]
        if not params:
            return None
        grads = [p.grad for p in params]
        if self.info.distributed:  # one all-reduce for the whole phase
            flat = torch.cat([g.flatten() for g in grads]).to(torch.float32)
            dist_utils.all_reduce_mean_(flat, self.info)
            torch._foreach_copy_(grads, [chunk.view_as(g) for chunk, g in
                                         zip(flat.split([g.numel() for g in grads]), grads)])
        # identical on every rank: the gradients were reduced first
        found_inf = self.scaler.unscale_and_check_(grads)
        fault = self.scaler.update(found_inf)
        phase.opt.found_inf = found_inf  # fused Adam leaves weights, moments and step alone
        try:
            phase.opt.step()
        finally:
            del phase.opt.found_inf
        phase.found_inf = found_inf
        return fault

    def _after_step(self, names: list[str], faults: list[torch.Tensor]) -> None:
        cfg = self.config
        beta = ema_beta(self.batch, self.cur_nimg, cfg["ema_kimg"], cfg["ema_rampup"])
        update_ema(self.G_ema, self.G, beta)
        if faults:
            self._unreported_faults.append((self.step, self.cur_nimg / 1000, names, faults))
        self.cur_nimg += self.batch
        self.step += 1
        due = self.step % cfg["adjust_interval"] == 0
        self.parts.adjust(self.info, self.batch, due=due)
        if due:
            self.report_faults()

    def report_faults(self) -> None:
        """Read the skip flags of the steps since the last report (one host sync), log each
        skipped phase with its step, and stop a run whose last ``max_nan_skips`` steps were all
        skipped: TrainingDiverged, raised before any further checkpoint is written."""
        pending, self._unreported_faults = self._unreported_faults, []
        if not pending:
            return
        flags = iter(torch.stack([f for *_, faults in pending for f in faults]).tolist())
        for step, kimg, names, _ in pending:
            bad = [name for name in names if next(flags)]
            for name in bad:
                self.log(f"non-finite gradient in phase {name} at step {step} "
                         f"(kimg {kimg:.3f}): optimiser step skipped")
            self.nan_streak = self.nan_streak + 1 if bad else 0
            if self.nan_streak >= self.config["max_nan_skips"]:
                kept = self.last_checkpoint or "none written yet"
                raise TrainingDiverged(
                    f"{self.nan_streak} consecutive steps with non-finite gradients (last in "
                    f"phases {', '.join(bad)} at step {step}); stopping without saving. The "
                    f"last good checkpoint is intact: {kept}")

    # ---- snapshots -----------------------------------------------------------------------
    @torch.no_grad()
    def save_grid(self, name: str) -> None:
        if not self.info.is_main:
            return
        images = []
        for z, c in zip(self.grid_z.split(self.batch_gpu), self.grid_c.split(self.batch_gpu)):
            out = self.G_ema(z.to(self.device), c.to(self.device), noise_mode="const")
            images.append(to_uint8(out).cpu())
        try:
            path = rundir.save_image_grid(torch.cat(images), self.outdir / name)
            rundir.copy_atomically(path, self.outdir / "fakes_latest.png")  # not encoded twice
        except OSError as error:  # a full disk: the checkpoint may still find room later
            self.log(f"image grid {name} not written: {error}; training continues")
            return
        self.log(f"image grid {path}")

    def save_reals_grid(self) -> None:
        if not self.info.is_main:
            return
        n = min(self.grid_z.shape[0], len(self.dataset))
        images = np.stack([self.dataset[i][0] for i in range(n)])
        try:
            rundir.save_image_grid(images, self.outdir / "reals.png")
        except OSError as error:
            self.log(f"image grid reals.png not written: {error}; training continues")

    def evaluate_metrics(self) -> None:
        cfg = self.config
        if not cfg["metrics"] or not self.info.is_main:
            dist_utils.barrier(self.info, "metrics barrier")
            return
        from batikfast.metrics import compute_metrics

        result = compute_metrics(self.G_ema, self.dataset, self._extractor, tuple(cfg["metrics"]),
                                 num_gen=cfg["metrics_num"], num_real=cfg["metrics_num"],
                                 batch=self.batch_gpu, device=self.device,
                                 real_cache=self._real_cache)
        self.log("metrics " + " ".join(f"{k} {v:.4f}" for k, v in result.items()))
        self.logger.scalars({f"Metrics/{k}": v for k, v in result.items()}, self.cur_nimg)
        dist_utils.barrier(self.info, "metrics barrier")

    # ---- the loop ------------------------------------------------------------------------
    def _workers(self) -> int:
        if self.config["workers"] is not None:
            return int(self.config["workers"])
        if self.device.type != "cuda":
            return 0  # a CPU run needs every core for the networks
        local_ranks = max(torch.cuda.device_count(), 1)
        return max(1, min(8, (os.cpu_count() or 2) // local_ranks - 1))

    # A signal this soon after the first is the same request: a scheduler that signals every
    # process of the job (Slurm's scancel) reaches each rank once itself and once more through
    # torchrun, which passes its own on; taken as "stop now", the second lost the checkpoint.
    SAME_STOP_REQUEST_S = 5.0

    def _install_signal_handlers(self):
        previous = {}
        first = []

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal is not None:
                if first and time.monotonic() - first[0] < self.SAME_STOP_REQUEST_S:
                    return  # the same request, arriving by another path
                # a second request (Ctrl-C again, say): stop now
                signal.signal(signum, previous.get(signum, signal.SIG_DFL))
                raise KeyboardInterrupt(name)
            # Only the flag: a handler runs between any two bytecodes of the main thread, also
            # inside the log file's write, and logging from here would re-enter that writer
            # ("reentrant call inside BufferedWriter", seen). The loop announces the stop.
            first.append(time.monotonic())
            self.stop_signal = name

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass
        return previous

    def _backend_in_force(self) -> str:
        """What the ops run on and why: --backend, BATIKFAST_BACKEND under auto, or a choice
        per call (the log said "auto" while the variable forced one)."""
        import batikfast

        if self.config["backend"] != "auto":
            return f"{self.config['backend']} (--backend)"
        forced = batikfast.get_backend()
        if forced is not None:
            return f"{forced} (BATIKFAST_BACKEND; --backend auto)"
        return "auto (the fastest implementation that can run each call)"

    @staticmethod
    def _launcher_pid() -> int | None:
        """The torchrun agent that started this rank (its parent when this module was first
        imported, so an agent lost during the setup counts too), or None outside torchrun."""
        return _PARENT_AT_IMPORT if "TORCHELASTIC_RUN_ID" in os.environ else None

    def _check_launcher(self, launcher: int | None) -> None:
        """A torchrun agent killed with SIGKILL (or lost with its terminal) leaves its workers
        running on their own: they would train on for days, holding the GPUs, and write into
        the run folder beside a restarted run. Its workers notice they were re-parented and
        stop as on SIGTERM: the ranks agree, save a checkpoint and exit."""
        if launcher is not None and self.stop_signal is None and os.getppid() != launcher:
            self.stop_signal = "the exit of torchrun"

    def _stop_agreed(self) -> bool:
        if not self.info.distributed:
            return self.stop_signal is not None
        if self.step % self.config["adjust_interval"]:
            return False  # ranks agree every few steps only: each check is a collective
        flag = torch.tensor([1.0 if self.stop_signal else 0.0], device=self.device)
        dist_utils.all_reduce_sum_(flag, self.info, "stop flag")
        return bool(flag.item() > 0)

    def run(self) -> dict:
        cfg = self.config
        total_nimg = int(round(cfg["kimg"] * 1000))
        loader = make_loader(self.dataset, self.batch_gpu, self.info.rank, self.info.world_size,
                             seed=cfg["seed"], start=self.cur_nimg, num_workers=self._workers(),
                             pin_memory=self.device.type == "cuda", prefetch_factor=4,
                             warning_log=self.logger.log_path)
        previous_handlers = self._install_signal_handlers()
        launcher = self._launcher_pid()
        self.log(self.parts.describe())
        self.log(f"op backend: {self._backend_in_force()} "
                 "(`python -m batikfast.info` lists what can run here)")
        self.log(f"training {cfg['cfg']} at {cfg['resolution']}x{cfg['resolution']} for "
                 f"{cfg['kimg']} kimg: batch {self.batch} = {self.info.world_size} processes x "
                 f"{self.rounds} rounds x {self.batch_gpu}, on {self.device}")
        if self.step == 0:
            self.save_reals_grid()
            self.save_grid("fakes_init.png")
        tick_start_nimg, tick_start = self.cur_nimg, time.time()
        start_time = time.time()
        stop_after = cfg.get("stop_after_steps")
        done = self.cur_nimg >= total_nimg
        stop_announced = False
        try:
            while not done:
                self.train_step(loader)
                self._check_launcher(launcher)
                done = self.cur_nimg >= total_nimg or (stop_after is not None
                                                        and self.step >= stop_after)
                stopping = self._stop_agreed()
                if stopping and self.stop_signal is None:
                    # Another rank noticed first (its parent's exit, a signal that reached it
                    # a moment earlier): the shared agent's exit is visible here by now, so
                    # look again rather than log "stopped by None" (seen, 1 run in ~20).
                    self._check_launcher(launcher)
                if self.stop_signal is not None and not stop_announced:
                    what = (f"torchrun (pid {launcher}), which started this rank, is gone"
                            if self.stop_signal == "the exit of torchrun" else
                            f"{self.stop_signal} received")
                    self.log(f"{what}: finishing this step and saving a checkpoint")
                    stop_announced = True
                tick_due = self.cur_nimg >= tick_start_nimg + cfg["tick_kimg"] * 1000
                if not (tick_due or done or stopping):
                    continue
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # time the work, not its queueing
                self.report_faults()  # the tick waits for the device anyway
                self._log_tick(time.time() - tick_start, self.cur_nimg - tick_start_nimg,
                               total_nimg)
                self.tick += 1
                tick_start_nimg = self.cur_nimg
                # A stop has a grace period (torchrun's, a scheduler's) before SIGKILL: the
                # checkpoint comes first, the metrics are left to `python -m batikfast.metrics`.
                if done or stopping or self.tick % cfg["snap"] == 0:
                    self.save_checkpoint(final=done or stopping)
                    if cfg["metrics"] and stopping and not done:
                        self.log("metrics not evaluated on a stop: run python -m "
                                 "batikfast.metrics on the checkpoint")
                    elif cfg["metrics"]:
                        self.evaluate_metrics()
                if done or stopping or self.tick % cfg["image_snap"] == 0:
                    self.save_grid(f"fakes{self.step:08d}.png")
                if stopping:
                    self.log(f"stopped by {self.stop_signal or 'a stop request of another rank'} "
                             f"at kimg {self.cur_nimg / 1000:.3f}; resume with --resume auto")
                    break
                tick_start = time.time()  # snapshots and metrics are not training time
        finally:
            for sig, old in previous_handlers.items():
                signal.signal(sig, old)
        self.log(f"done: kimg {self.cur_nimg / 1000:.3f}, step {self.step}, "
                 f"{time.time() - start_time:.1f} s")
        return {"cur_nimg": self.cur_nimg, "step": self.step, "checkpoint": self.last_checkpoint,
                "stopped_by": self.stop_signal, "training_state": self.parts.state_dict()}

    def _log_tick(self, seconds: float, nimg: int, total_nimg: int) -> None:
        stats = self.parts.pop_stats(self.info)
        sec_per_kimg = seconds / max(nimg / 1000, 1e-9)
        mem = rundir.gpu_memory_gib(self.device)
        fields = [f"tick {self.tick:<4d}", f"kimg {self.cur_nimg / 1000:<8.3f}",
                  f"sec/kimg {sec_per_kimg:<7.2f}", f"img/s {nimg / max(seconds, 1e-9):<7.1f}",
                  f"gpumem {mem:<5.2f}"]
        fields += [f"{label} {stats[key]:.4g}" for key, label in TICK_FIELDS if key in stats]
        fields.append(rundir.progress_bar(self.cur_nimg / max(total_nimg, 1)))
        remaining = max(total_nimg - self.cur_nimg, 0) / 1000 * sec_per_kimg
        fields.append(f"eta {int(remaining // 3600)}h{int(remaining % 3600 // 60):02d}m")
        self.log("  ".join(fields))
        self.logger.scalars({"Progress/kimg": self.cur_nimg / 1000,
                             "Timing/sec_per_kimg": sec_per_kimg,
                             "Timing/images_per_s": nimg / max(seconds, 1e-9),
                             "Resources/gpu_mem_gib": mem, **stats}, self.cur_nimg)


def train(config: dict, outdir, resume: str | None = None, given=None) -> dict:
    """Run training (single process, or one rank under torchrun); returns the final progress.

    On resume the checkpoint's configuration is kept, except for the run-time options
    (``RUNTIME_KEYS``): those of ``config`` replace the saved ones, all of them when ``given``
    is None, else only those named in ``given`` (the options set on the command line), so
    that a preset's defaults do not replace the run's own values (its kimg, or a batch_gpu
    chosen for its batch)."""
    info = dist_utils.init_distributed(config["device"], config["ddp_timeout_s"])
    try:
        progress = _train(config, Path(outdir), resume, info, given)
    except dist_utils.RankFailure:
        # Not torn down: gloo aborts the process (std::terminate from its worker thread,
        # SIGABRT) when a group whose peer hung is destroyed; the caller exits (train.py:
        # os._exit) with the message already out.
        raise
    except BaseException:
        dist_utils.shutdown()
        raise
    dist_utils.shutdown(wait_for_peers=True)
    return progress


def _resume_state(resume, outdir: Path, info) -> tuple[dict | None, str | None]:
    """The checkpoint to resume from, the same on every rank: (state, its path) or (None, None).

    Each rank looks on its own file system. Where they disagree (a run folder that is not
    shared between nodes, so only rank 0's node holds checkpoints; a path that some nodes
    lack), the rank holding the newest checkpoint sends its file to the others, which verify
    and load it as they would from disk. A rank that started from scratch beside resumed ones
    would train other weights on another step count."""
    data, source, state, error = None, None, None, None
    try:
        if resume == "auto":
            # The newest that is intact and holds a training state: truncated, corrupt and
            # foreign files are skipped, saying so; one of a newer format stops the run
            # (resuming an older one instead would drop the newer run's progress).
            path, data, state = ckpt.latest_resumable_checkpoint(
                outdir, warn=print if info.is_main else (lambda m: None))
            source = None if path is None else str(path)
        elif resume:
            data, source = ckpt.read_checkpoint_file(resume), str(resume)
            state = ckpt.check_training_state(ckpt.load_checkpoint_bytes(data, source), source)
    except ckpt.CheckpointError as err:  # raised below unless another rank has a checkpoint
        data, state, error = None, None, err
    step = None if state is None else int(state["progress"]["step"])
    steps = dist_utils.all_gather_objects(step, info, "checkpoint agreement")
    holders = [rank for rank, s in enumerate(steps) if s is not None]
    if not holders:
        if error is not None:
            raise error
        return None, None
    newest = max(steps[rank] for rank in holders)
    if all(s == newest for s in steps):
        return state, source
    src = min(rank for rank in holders if steps[rank] == newest)
    data, source = dist_utils.broadcast_object(
        (data, source) if info.rank == src else None, info, f"checkpoint from rank {src}", src)
    if info.is_main:
        print(f"resuming: the ranks found checkpoints at steps {steps} (None: none); every "
              f"rank continues from rank {src}'s {source}")
    return ckpt.check_training_state(
        ckpt.load_checkpoint_bytes(data, f"{source} (from rank {src})"), source), source


def _train(config: dict, outdir: Path, resume, info, given=None) -> dict:
    error = None
    if info.is_main:
        try:
            rundir.check_output_dir(outdir, need_bytes=64 << 20)
        except rundir.OutputDirError as err:
            error = str(err)
    error = dist_utils.broadcast_object(error, info, "output folder check")
    if error:
        raise rundir.OutputDirError(error)

    state, source = _resume_state(resume, outdir, info)
    if state is not None:
        saved = state["config"]
        for key, value in config.items():
            # stop_after_steps belongs to one invocation: a saved one would end the resumed run
            chosen = given is None or key in given or key == "stop_after_steps"
            if key in RUNTIME_KEYS:
                if key == "data" and chosen and saved.get(key) != value and info.is_main:
                    # where the images are now: a moved dataset, another node's mount point
                    print(f"resuming: reading the images from data={value!r} (the checkpoint's "
                          f"run read {saved.get(key)!r})")
                if chosen or key not in saved:
                    saved[key] = value
            elif (chosen and key in saved and saved[key] != value and info.is_main
                  and key != "cfg"):
                print(f"resuming: keeping the checkpoint's {key}={saved[key]!r} "
                      f"(not {value!r}); only run-time options change on resume")
        config = saved
        try:  # the checkpoint's batch on this number of processes
            split_batch(config, info.world_size)
        except ConfigError as error:
            raise ConfigError(f"cannot resume {source} on {info.world_size} processes: "
                              f"{error}") from error
    trainer = Trainer(config, outdir, info, resuming=state is not None)
    if info.is_main:
        try:
            rundir.save_config(outdir, config)
        except OSError as error:  # every checkpoint holds the config too: not worth the run
            trainer.log(f"warning: training_options.json not written ({error}); each "
                        "checkpoint holds the configuration")
    warning = dist_utils.elastic_restart_warning()
    if warning:
        trainer.log(f"warning: {warning}")
    if state is None:
        trainer.log("starting from scratch" + (" (no valid checkpoint in the output folder)"
                                                if resume == "auto" else ""))
    else:
        trainer.load_state_dict(state, str(source))
    if info.is_main:  # the one writer: other nodes' folders hold no checkpoints of this run
        try:
            moved = ckpt.set_aside_checkpoints_after(outdir, trainer.step)
        except OSError as error:
            raise ckpt.CheckpointError(f"cannot set aside the checkpoints in {outdir} beyond "
                                       f"step {trainer.step}: {error}") from error
        if moved:
            trainer.log(f"set aside {len(moved)} checkpoint(s) beyond step {trainer.step}, of "
                        f"an earlier or abandoned run in this folder (this run's would be pruned "
                        f"as written, and --resume auto would pick them): "
                        f"{', '.join(p.name for p in moved)}")
    try:
        return trainer.run()
    finally:
        trainer.logger.close()
