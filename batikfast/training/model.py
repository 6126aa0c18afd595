"""Builds the model-side objects the loop drives: networks, diffusion, augmentation, loss.

The loop sees one :class:`TrainingParts` object: ``accumulate_gradients`` (NVIDIA's phase API;
with compile on, the main phases run compiled modules and the regularisation phases take their
inner gradient with torch.func inside compiled functions, falling back to eager for a phase,
with one log line, when compiling it fails at its first call),
``adjust`` (p and T from the all-reduced signs of the real logits, identical on every rank),
``pop_stats`` (tick averages of the losses, reduced over ranks), and ``state_dict``.
"""
from __future__ import annotations

import torch

from batikfast.training import distributed as dist_utils

MAIN_PHASES = ("Gmain", "Dmain")
REG_PHASES = {"Greg": "path length", "Dreg": "R1"}
# Without lazy regularisation Gboth and Dboth run: their main part eagerly (double backward and
# compiled modules do not mix), their regulariser as Greg's and Dreg's, falling back with them.
REGULARIZER_OF = {"Greg": "Greg", "Gboth": "Greg", "Dreg": "Dreg", "Dboth": "Dreg"}
# torch.compile options of the regularisers' compiled inner gradients (tests swap the backend).
REG_COMPILE_OPTIONS: dict = {}


def _dtype(value):
    return getattr(torch, value) if isinstance(value, str) else value


def build_generator(G_kwargs: dict, device="cpu"):
    from batikfast.networks import Generator

    kwargs = dict(G_kwargs)
    if "mixed_precision_dtype" in kwargs:
        kwargs["mixed_precision_dtype"] = _dtype(kwargs["mixed_precision_dtype"])
    return Generator(**kwargs).to(device)


def build_networks(G_kwargs: dict, D_kwargs: dict, device):
    from batikfast.networks import Discriminator

    kwargs = dict(D_kwargs)
    if "mixed_precision_dtype" in kwargs:
        kwargs["mixed_precision_dtype"] = _dtype(kwargs["mixed_precision_dtype"])
    G = build_generator(G_kwargs, device).train().requires_grad_(False)
    D = Discriminator(**kwargs).to(device).train().requires_grad_(False)
    return G, D


class TrainingParts:
    def __init__(self, config: dict, G, D, device, rank: int = 0, log=print):
        from batikfast.loss import StyleGAN2Loss

        self.config = config
        self.device = torch.device(device)
        self.augment_pipe = self._make_augment(config)
        self.ada_p = 0.0  # augmentation p when ADA adapts it alone (no diffusion)
        self.diffusion = None
        if config["diffusion"]:
            from batikfast.diffusion import Diffusion

            self.diffusion = Diffusion(
                beta_schedule=config["beta_schedule"], beta_start=config["beta_start"],
                beta_end=config["beta_end"], t_min=config["t_min"], t_max=config["t_max"],
                noise_std=config["noise_std"], ts_dist=config["ts_dist"],
                target=config["diffusion_target"], ada_kimg=config["diffusion_kimg"],
                ada_interval=config["adjust_interval"],
                augment_pipe=self.augment_pipe if config["aug"] == "ada" else None,
                seed=config["seed"], rank=rank)
        common = dict(diffusion=self.diffusion, augment_pipe=self.augment_pipe,
                      loss=config["loss"], r1_gamma=config["r1_gamma"],
                      style_mixing_prob=config["style_mixing"], pl_weight=config["pl_weight"],
                      device=self.device)
        self.log = log
        self.compiled = self._want_compile(config)
        self.cudagraphs = self._want_cudagraphs(config)
        # The loss of every phase but the compiled main ones; it holds the path-length mean.
        self.reg_loss = StyleGAN2Loss(
            G.mapping, G.synthesis, D, **common,
            compile_regularizers=dict(REG_COMPILE_OPTIONS) if self.compiled else None)
        self.main_loss = self.reg_loss
        if self.compiled:
            # CUDA graphs for the main phases only: the regularisers run every 4 / 16 steps.
            mode = "reduce-overhead" if self.cudagraphs else None
            self.main_loss = StyleGAN2Loss(
                torch.compile(G.mapping, mode=mode), torch.compile(G.synthesis, mode=mode),
                torch.compile(D, mode=mode), **common)
        self._reg_modules = {"Greg": G, "Dreg": D}
        self._untried_reg_phases = set(self.reg_loss.compiled_regularizers())
        self._reg_fallbacks: dict[str, str] = {}
        self.compile_note = self._describe_compilation()
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._ada_sign_sum = torch.zeros([], dtype=torch.float64, device=self.device)
        self._ada_sign_count = 0

    # ---- construction helpers ---------------------------------------------------------------
    def _want_compile(self, config) -> bool:
        want = config["compile"]
        if want is None:
            want = self.device.type == "cuda"
        return bool(want)

    def _want_cudagraphs(self, config) -> bool:
        if not config.get("cudagraphs", False):
            return False
        if not self.compiled:
            raise ValueError("cudagraphs=True needs compile on (CUDA graphs are torch.compile's "
                             f"mode 'reduce-overhead'), got compile={config['compile']!r}")
        if self.device.type != "cuda":
            raise ValueError(f"cudagraphs=True needs a CUDA device, got device {self.device}")
        return True

    def _describe_compilation(self) -> str:
        if not self.compiled:
            return "torch.compile off: every phase runs eagerly"
        note = "torch.compile" + (" (mode reduce-overhead: CUDA graphs)" if self.cudagraphs
                                  else "") + ": Gmain and Dmain compiled"
        both = [f"{net}both" for net in "GD" if not self.config.get(f"{net.lower()}_reg_interval")]
        if both:
            note += f" ({' and '.join(both)}: main part eager)"
        for phase, what in REG_PHASES.items():
            if phase in self._reg_fallbacks:
                note += (f"; {phase} ({what}) runs eagerly, compiling it failed: "
                         f"{self._reg_fallbacks[phase]}")
            else:
                note += f"; {phase} ({what}) compiled, its inner gradient through torch.func"
        return note

    def _make_augment(self, config):
        from batikfast.augment import AugmentPipe, DiffAugment

        if config["aug"] == "ada":
            return AugmentPipe.bgc().train().requires_grad_(False).to(self.device)
        if config["aug"] == "diff":
            return DiffAugment().to(self.device)
        return None

    # ---- what the loop calls ----------------------------------------------------------------
    def describe(self) -> str:
        parts = [f"loss {self.config['loss']}", f"aug {self.config['aug']}",
                 repr(self.diffusion) if self.diffusion else "no diffusion", self.compile_note]
        return "; ".join(parts)

    def accumulate_gradients(self, phase: str, **kwargs) -> None:
        if REGULARIZER_OF.get(phase) in self._untried_reg_phases:
            stats = self._first_compiled_regularization(phase, kwargs)
        else:
            loss = self.main_loss if phase in MAIN_PHASES else self.reg_loss
            stats = loss.accumulate_gradients(phase=phase, **kwargs)
        for key, value in stats.items():
            value = value.detach().float()
            self._sums[key] = self._sums.get(key, 0) + value.sum()
            self._counts[key] = self._counts.get(key, 0) + value.numel()
        if "signs/real" in stats and self.diffusion is None:
            signs = stats["signs/real"]  # kept on the device: no synchronisation per phase
            self._ada_sign_sum = self._ada_sign_sum + signs.detach().double().sum()
            self._ada_sign_count += signs.numel()

    def _first_compiled_regularization(self, phase: str, kwargs: dict) -> dict:
        """Run ``phase`` with its regulariser compiled; if that raises, run it (and every later
        call) eagerly.

        The first call of a phase is the first round of its step: the optimiser has just
        zeroed the gradients, so dropping whatever a failed attempt accumulated is exact.
        (A retried path-length call updates the mapping's w_avg twice, once.)"""
        reg = REGULARIZER_OF[phase]
        self._untried_reg_phases.discard(reg)
        pl_mean = self.reg_loss.pl_mean
        try:
            return self.reg_loss.accumulate_gradients(phase=phase, **kwargs)
        except Exception as error:  # the GPU machine's torch may fail where this one compiles
            self._reg_fallbacks[reg] = f"{_describe_error(error)} (torch {torch.__version__})"
            self.compile_note = self._describe_compilation()
            self.reg_loss.use_eager_regularizer(reg)
            self.reg_loss.pl_mean = pl_mean
            self._reg_modules[reg].zero_grad(set_to_none=True)
            self.log(f"torch.compile: {phase} ({REG_PHASES[reg]}) falls back to eager: "
                     f"compiling it failed at its first call with {self._reg_fallbacks[reg]}")
            return self.reg_loss.accumulate_gradients(phase=phase, **kwargs)

    @property
    def augment_p(self) -> float:
        return float(getattr(self.augment_pipe, "p", 0.0)) if self.augment_pipe is not None else 0.0

    def adjust(self, info, batch: int, due: bool) -> None:
        """After every step: count it; every ``adjust_interval`` steps (``due``) move p and T
        from the signs of D's real logits, all-reduced so every rank moves identically."""
        if self.diffusion is not None:
            stats = None
            if due:
                stats = dist_utils.all_reduce_sum_(self.diffusion.sign_stats().to(self.device),
                                                   info, "diffusion statistics")
            self.diffusion.step(batch, stats)
        elif self.config["aug"] == "ada" and due:
            stats = torch.stack([self._ada_sign_sum, torch.tensor(
                float(self._ada_sign_count), dtype=torch.float64, device=self.device)])
            stats = dist_utils.all_reduce_sum_(stats, info, "ADA statistics").cpu()
            self._ada_sign_sum = torch.zeros_like(self._ada_sign_sum)
            self._ada_sign_count = 0
            if stats[1] > 0:
                error = float(stats[0] / stats[1]) - self.config["ada_target"]
                interval = self.config["adjust_interval"]
                step = batch * interval / (self.config["ada_kimg"] * 1000)
                self.ada_p = min(max(self.ada_p + step * ((error > 0) - (error < 0)), 0.0), 1.0)
                self.augment_pipe.p = self.ada_p

    def sign_statistics(self) -> dict:
        """This rank's signs of D's real logits since the last update of p, as
        ``{"diffusion": [sum, count], "ada": [sum, count]}`` (each rank holds its own share
        until the all-reduce)."""
        out = {"ada": [float(self._ada_sign_sum), self._ada_sign_count]}
        if self.diffusion is not None:
            state = self.diffusion.state_dict()
            out["diffusion"] = [float(state["sign_sum"]), int(state["sign_count"])]
        return out

    def load_sign_statistics(self, signs: dict) -> None:
        """Set what :meth:`sign_statistics` returned (this rank's share)."""
        total, count = signs["ada"]
        self._ada_sign_sum = torch.tensor(float(total), dtype=torch.float64, device=self.device)
        self._ada_sign_count = int(count)
        if self.diffusion is not None and "diffusion" in signs:
            state = self.diffusion.state_dict()
            state["sign_sum"], state["sign_count"] = signs["diffusion"]
            self.diffusion.load_state_dict(state)

    def pop_stats(self, info) -> dict:
        """Means over the tick (all ranks) of the losses and scores, plus T and p."""
        keys = sorted(self._sums)
        out = {}
        if keys:
            sums = torch.stack([torch.as_tensor(self._sums[k], dtype=torch.float32,
                                                device=self.device) for k in keys])
            counts = torch.tensor([float(self._counts[k]) for k in keys], device=self.device)
            packed = dist_utils.all_reduce_sum_(torch.cat([sums, counts]), info, "tick statistics")
            values = (packed[:len(keys)] / packed[len(keys):].clamp(min=1)).tolist()
            out = {f"Loss/{k}": v for k, v in zip(keys, values)}
        self._sums, self._counts = {}, {}
        if self.diffusion is not None:
            out["Diffusion/T"] = float(self.diffusion.T)
            out["Diffusion/p"] = float(self.diffusion.p)
        if self.augment_pipe is not None and hasattr(self.augment_pipe, "p"):
            out["Augment/p"] = self.augment_p
        return out

    def state_dict(self) -> dict:
        return {"diffusion": self.diffusion.state_dict() if self.diffusion else None,
                "augment_p": self.augment_p, "ada_p": self.ada_p,
                "ada_signs": [float(self._ada_sign_sum), self._ada_sign_count],
                "loss": self.reg_loss.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.diffusion is not None and state.get("diffusion") is not None:
            self.diffusion.load_state_dict(state["diffusion"])
        self.ada_p = float(state["ada_p"])
        self._ada_sign_sum = torch.tensor(float(state["ada_signs"][0]), dtype=torch.float64,
                                          device=self.device)
        self._ada_sign_count = int(state["ada_signs"][1])
        if self.augment_pipe is not None and hasattr(self.augment_pipe, "p"):
            self.augment_pipe.p = float(state["augment_p"])
        self.reg_loss.load_state_dict(state["loss"])


def _describe_error(error: BaseException) -> str:
    """``Type: first line`` of ``error`` and of its causes (Dynamo wraps the one that matters)."""
    parts = []
    while error is not None and len(parts) < 3:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].endswith(":"):  # "backend='x' raised:" and the reason
            lines[0] = f"{lines[0]} {lines[1]}"
        if lines and len(lines[0]) > 360:  # Dynamo puts the op first and the reason last
            lines[0] = f"{lines[0][:120]} ... {lines[0][-240:]}"
        parts.append(f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)
        error = error.__cause__
    return "; caused by ".join(parts)


def build_training_objects(config: dict, G, D, device, rank: int = 0, log=print) -> TrainingParts:
    return TrainingParts(config, G, D, device, rank, log)
