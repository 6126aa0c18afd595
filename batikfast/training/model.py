"""Builds the model-side objects the loop drives: networks, diffusion, augmentation, loss.

The loop sees one :class:`TrainingParts` object: ``accumulate_gradients`` (NVIDIA's phase API,
routed to compiled modules for the main phases and eager ones for the regularisation phases),
``adjust`` (p and T from the all-reduced signs of the real logits, identical on every rank),
``pop_stats`` (tick averages of the losses, reduced over ranks), and ``state_dict``.
"""
from __future__ import annotations

import torch

from batikfast.training import distributed as dist_utils

# Gboth and Dboth hold the regularisers too (double backward): they stay eager with Greg, Dreg.
MAIN_PHASES = ("Gmain", "Dmain")


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
        self.eager_loss = StyleGAN2Loss(G.mapping, G.synthesis, D, **common)
        self.main_loss = self.eager_loss
        self.compiled = self._want_compile(config)
        self.compile_note = "torch.compile off: every phase runs eagerly"
        if self.compiled:
            self.main_loss = StyleGAN2Loss(torch.compile(G.mapping), torch.compile(G.synthesis),
                                           torch.compile(D), **common)
            self.compile_note = ("torch.compile: Gmain and Dmain compiled; Greg (path length) "
                                 "and Dreg (R1) run eagerly, their double backward does not "
                                 "compile")
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
        loss = self.main_loss if phase in MAIN_PHASES else self.eager_loss
        stats = loss.accumulate_gradients(phase=phase, **kwargs)
        for key, value in stats.items():
            value = value.detach().float()
            self._sums[key] = self._sums.get(key, 0) + value.sum()
            self._counts[key] = self._counts.get(key, 0) + value.numel()
        if "signs/real" in stats and self.diffusion is None:
            signs = stats["signs/real"]  # kept on the device: no synchronisation per phase
            self._ada_sign_sum = self._ada_sign_sum + signs.detach().double().sum()
            self._ada_sign_count += signs.numel()

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
                "loss": self.eager_loss.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.diffusion is not None and state.get("diffusion") is not None:
            self.diffusion.load_state_dict(state["diffusion"])
        self.ada_p = float(state["ada_p"])
        self._ada_sign_sum = torch.tensor(float(state["ada_signs"][0]), dtype=torch.float64,
                                          device=self.device)
        self._ada_sign_count = int(state["ada_signs"][1])
        if self.augment_pipe is not None and hasattr(self.augment_pipe, "p"):
            self.augment_pipe.p = float(state["augment_p"])
        self.eager_loss.load_state_dict(state["loss"])


def build_training_objects(config: dict, G, D, device, rank: int = 0, log=print) -> TrainingParts:
    return TrainingParts(config, G, D, device, rank, log)
