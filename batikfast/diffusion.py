"""Diffusion-GAN's forward diffusion: noise schedules, adaptive length T, t sampling.

The discriminator sees ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) * noise_std * eps`` with t drawn
per image from a pool of 64 steps: 32 zeros (clean images) and 32 draws over ``1..T``. T follows
the overfitting heuristic ``p`` of ADA: every ``ada_interval`` minibatches
``p += sign(mean(sign(D(real))) - target) * batch * ada_interval / (ada_kimg * 1000)``, clipped
to [0, 1], then ``T = clip(t_min + round(p * (t_max - t_min)), t_min, t_max)``; the betas are
rebuilt for the new T and the pool is redrawn.

Fidelity notes. Diffusion-GAN's code weights its "priority" draws by ``k - 1`` over ``1..T`` (so
t = 1 is never drawn); the paper writes ``P(k) ∝ k``, and we follow the paper. The raw real
logits are signed (midpoint 0), as in the code.

Reproducibility across ranks and resumes: the pool is drawn from a ``torch.Generator`` seeded by
``seed`` (the same on every rank, so every rank holds the same pool); the per-image t and the
noise seed of each call come from a counter-based stream keyed by ``(seed, rank, call index)``,
so ranks draw different t but nothing depends on the order of other RNG use.
``state_dict()`` / ``load_state_dict()`` carry p, T, the pool, the generator and the counters.
"""
from __future__ import annotations

import math

import torch

from batikfast import ops

BETA_SCHEDULES = ("linear", "quadratic", "constant", "jsd", "sigmoid", "cosine")
_SCHEDULE_ALIASES = {"quad": "quadratic", "const": "constant"}
T_DISTRIBUTIONS = ("priority", "uniform")
_MASK64 = (1 << 64) - 1


def beta_schedule(name: str, num_steps: int, beta_start: float = 1e-4,
                  beta_end: float = 2e-2) -> torch.Tensor:
    """The ``num_steps`` betas (float64) of the named schedule, as Diffusion-GAN defines them."""
    name = _SCHEDULE_ALIASES.get(name, name)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if name == "linear":
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    elif name == "quadratic":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps,
                               dtype=torch.float64) ** 2
    elif name == "constant":
        betas = torch.full([num_steps], beta_end, dtype=torch.float64)
    elif name == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / torch.linspace(num_steps, 1, num_steps, dtype=torch.float64)
    elif name == "sigmoid":
        ramp = torch.linspace(-6, 6, num_steps, dtype=torch.float64)
        betas = torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start
    elif name == "cosine":  # Nichol & Dhariwal, offset s = 0.008
        s = 0.008
        x = torch.linspace(0, num_steps + 1, num_steps + 1, dtype=torch.float64)
        alpha_bar = torch.cos((x / (num_steps + 1) + s) / (1 + s) * math.pi * 0.5) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {name!r}")
    return betas


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class Diffusion:
    """Adaptive forward diffusion for the discriminator's inputs.

    Args:
        beta_schedule: one of ``linear quadratic constant jsd sigmoid cosine``.
        beta_start, beta_end: range of the linear-type schedules.
        t_min, t_max: bounds of the diffusion length T.
        noise_std: scale of the noise on top of the schedule.
        ts_dist: ``"priority"`` (P(k) ∝ k over 1..T) or ``"uniform"``.
        target: the value of mean(sign(D(real))) that p steers towards.
        ada_kimg: thousands of images for p to travel from 0 to 1.
        ada_interval: minibatches between updates of p and T.
        pool_size: size of the t pool; half of it is zeros.
        ada_maxp: cap of the augmentation probability derived from p (``augment_p``).
        augment_pipe: optional object with a ``p`` attribute set to ``augment_p`` on each update.
        seed, rank: keys of the random streams (same seed on every rank).
        p: initial p. impl: implementation of ``ops.diffusion_noise``.
    """

    def __init__(self, beta_schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 2e-2, t_min: int = 10, t_max: int = 1000,
                 noise_std: float = 0.05, ts_dist: str = "priority", target: float = 0.6,
                 ada_kimg: float = 100, ada_interval: int = 4, pool_size: int = 64,
                 ada_maxp: float | None = 0.25, augment_pipe=None, seed: int = 0, rank: int = 0,
                 p: float = 0.0, impl: str | None = None):
        beta_schedule = _SCHEDULE_ALIASES.get(beta_schedule, beta_schedule)
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, "
                             f"got {beta_schedule!r}")
        if ts_dist not in T_DISTRIBUTIONS:
            raise ValueError(f"ts_dist must be one of {T_DISTRIBUTIONS}, got {ts_dist!r}")
        if not (isinstance(t_min, int) and isinstance(t_max, int) and 1 <= t_min <= t_max):
            raise ValueError(f"need integers 1 <= t_min <= t_max, got t_min={t_min!r}, "
                             f"t_max={t_max!r}")
        if pool_size < 2 or pool_size % 2:
            raise ValueError(f"pool_size must be an even number >= 2, got {pool_size!r}")
        if ada_interval < 1:
            raise ValueError(f"ada_interval must be >= 1, got {ada_interval!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p!r}")
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.t_min = t_min
        self.t_max = t_max
        self.noise_std = float(noise_std)
        self.ts_dist = ts_dist
        self.target = target
        self.ada_kimg = ada_kimg
        self.ada_interval = ada_interval
        self.pool_size = pool_size
        self.ada_maxp = ada_maxp
        self.augment_pipe = augment_pipe
        self.seed = int(seed)
        self.rank = int(rank)
        self.impl = impl
        self.p = float(p)
        self._pool_rng = torch.Generator().manual_seed(self.seed)
        self._calls = 0
        self._minibatches = 0
        self._sign_sum = None
        self._sign_count = 0
        self._device_schedules = {}
        self.update_T()

    # -- schedule and pool ------------------------------------------------------------------

    @property
    def augment_p(self) -> float:
        """The augmentation probability tied to p (Diffusion-GAN: min(p, ada_maxp))."""
        return min(self.p, self.ada_maxp) if self.ada_maxp is not None else self.p

    def t_for_p(self, p: float) -> int:
        t = int(self.t_min + round(p * (self.t_max - self.t_min)))
        return max(self.t_min, min(self.t_max, t))

    def update_T(self) -> None:
        """Set T from p, rebuild the schedule for it and redraw the t pool."""
        self._set_schedule(self.t_for_p(self.p))
        self.pool = self._draw_pool()
        if self.augment_pipe is not None:
            _set_augment_p(self.augment_pipe, self.augment_p)

    def _set_schedule(self, T: int) -> None:
        self.T = T
        self.betas = beta_schedule(self.beta_schedule, T, self.beta_start, self.beta_end)
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64),
                               torch.cumprod(1 - self.betas, dim=0)])
        # Index t = 0 is the clean image: alpha_bar_0 = 1.
        self.sqrt_alpha_bar = alpha_bar.sqrt().float()
        self.sqrt_one_minus_alpha_bar = (1 - alpha_bar).sqrt().float()
        self._device_schedules = {}

    def _draw_pool(self) -> torch.Tensor:
        half = self.pool_size // 2
        steps = torch.arange(1, self.T + 1, dtype=torch.float64)
        weights = steps if self.ts_dist == "priority" else torch.ones_like(steps)
        picks = torch.multinomial(weights, half, replacement=True, generator=self._pool_rng)
        draws = steps[picks].long()
        return torch.cat([draws, torch.zeros(half, dtype=torch.long)])

    def schedules(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt_alpha_bar, sqrt_one_minus_alpha_bar) of length T + 1 on ``device``."""
        device = torch.device(device)
        if device not in self._device_schedules:
            self._device_schedules[device] = (_to_device(self.sqrt_alpha_bar, device),
                                              _to_device(self.sqrt_one_minus_alpha_bar, device))
        return self._device_schedules[device]

    # -- adaptation ---------------------------------------------------------------------------

    def accumulate(self, real_logits: torch.Tensor) -> None:
        """Record the signs of the discriminator's raw logits on real images."""
        signs = real_logits.detach().float().sign()
        total = signs.sum()
        self._sign_sum = total if self._sign_sum is None else self._sign_sum + total
        self._sign_count += signs.numel()

    def sign_stats(self) -> torch.Tensor:
        """[sum of signs, count] since the last update, for an all-reduce across ranks."""
        total = self._sign_sum.cpu() if self._sign_sum is not None else torch.zeros([])
        return torch.stack([total.double(), torch.tensor(float(self._sign_count),
                                                          dtype=torch.float64)])

    def step(self, batch_size: int, sign_stats: torch.Tensor | None = None) -> bool:
        """Count one minibatch of ``batch_size`` images (all ranks together); every
        ``ada_interval`` minibatches, adjust p and T from the recorded signs (or from
        ``sign_stats``, an all-reduced :meth:`sign_stats`). Returns True when T was updated."""
        self._minibatches += 1
        if self._minibatches % self.ada_interval != 0:
            return False
        stats = self.sign_stats() if sign_stats is None else sign_stats.double().cpu()
        self._sign_sum, self._sign_count = None, 0
        if float(stats[1]) == 0:
            return False
        self.adjust(float(stats[0] / stats[1]), batch_size)
        return True

    def adjust(self, mean_real_sign: float, batch_size: int) -> None:
        """One ADA-style update of p from mean(sign(D(real))), then :meth:`update_T`."""
        error = mean_real_sign - self.target
        direction = float((error > 0) - (error < 0))
        step = batch_size * self.ada_interval / (self.ada_kimg * 1000)
        self.p = min(max(self.p + direction * step, 0.0), 1.0)
        self.update_T()

    # -- noising ------------------------------------------------------------------------------

    def _call_stream(self) -> torch.Generator:
        key = _splitmix64(_splitmix64(_splitmix64(self.seed) ^ self.rank) ^ self._calls)
        self._calls += 1
        return torch.Generator().manual_seed(key & ((1 << 63) - 1))

    def sample_t(self, batch_size: int, device=None) -> torch.Tensor:
        """Per-image steps drawn from the pool, as an int64 tensor [batch_size]."""
        picks = torch.randint(0, self.pool_size, (batch_size,), generator=self._call_stream())
        return _to_device(self.pool[picks], torch.device(device or "cpu"))

    def __call__(self, x: torch.Tensor, t: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None):
        """Noise ``x`` [N, ...] to per-image steps; returns ``(x_t, t)`` with t int64 [N].

        ``t`` (default: drawn from the pool) and ``noise`` (default: drawn inside the kernel)
        may be given, e.g. to compare implementations."""
        stream = self._call_stream()
        host_t = None
        if t is None:
            # Drawn on the host and handed to the op there: its range check then needs no
            # device sync (one per discriminator call otherwise).
            host_t = self.pool[torch.randint(0, self.pool_size, (x.shape[0],), generator=stream)]
            t = _to_device(host_t, x.device)
        noise_seed = int(torch.randint(0, 2 ** 62, (), generator=stream))
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self.schedules(x.device)
        x_t = ops.diffusion_noise(x, host_t if host_t is not None else t, sqrt_alpha_bar,
                                  sqrt_one_minus_alpha_bar, noise_std=self.noise_std,
                                  noise=noise, seed=noise_seed, impl=self.impl)
        return x_t, t

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain tensors and numbers (loads with ``torch.load(weights_only=True)``)."""
        stats = self.sign_stats()
        return {"p": self.p, "T": self.T, "pool": self.pool.clone(),
                "pool_rng": self._pool_rng.get_state(), "calls": self._calls,
                "minibatches": self._minibatches, "sign_sum": float(stats[0]),
                "sign_count": self._sign_count, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.p = float(state["p"])
        self._set_schedule(int(state["T"]))
        self.pool = state["pool"].clone().long()
        self._pool_rng.set_state(state["pool_rng"])
        self._calls = int(state["calls"])
        self._minibatches = int(state["minibatches"])
        self._sign_count = int(state["sign_count"])
        self._sign_sum = torch.tensor(float(state["sign_sum"])) if self._sign_count else None
        self.seed = int(state["seed"])
        if self.augment_pipe is not None:
            _set_augment_p(self.augment_pipe, self.augment_p)

    def __repr__(self) -> str:
        return (f"Diffusion(beta_schedule={self.beta_schedule!r}, p={self.p:.4f}, T={self.T}, "
                f"ts_dist={self.ts_dist!r}, noise_std={self.noise_std})")


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device``; through pinned memory to a GPU, so that the copy
    is asynchronous (from pageable memory it would wait for the GPU's queued work)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _set_augment_p(pipe, value: float) -> None:
    current = getattr(pipe, "p", None)
    if isinstance(current, torch.Tensor):
        current.copy_(torch.as_tensor(value, dtype=current.dtype))
    else:
        pipe.p = value
