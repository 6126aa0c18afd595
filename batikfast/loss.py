"""The StyleGAN2 losses with Diffusion-GAN's noised discriminator inputs.

``StyleGAN2Loss`` follows NVIDIA's ``accumulate_gradients(phase, ...)``: phases ``Gmain``,
``Greg``, ``Gboth``, ``Dmain``, ``Dreg``, ``Dboth``; each computes its losses and calls
``backward`` (the caller steps the optimisers). Before the discriminator, real and fake images
alike are augmented (``augment_pipe``) and then noised (``diffusion``), and the discriminator
also sees the step t.

- ``loss="stylegan2"``: non-saturating logistic loss; R1 on real images with weight
  ``r1_gamma / 2``, its gradient taken with respect to the real image *before* augmentation and
  noise (through both); path-length regularisation (decay 0.01, weight 2, batch shrink 2);
  style mixing with probability 0.9.
- ``loss="wgan"``: the Wasserstein variant of the batik paper's code: generator ``-D(G(z))``,
  discriminator ``D(G(z)) - D(x)``; R1 and path length kept.

Lazy regularisation (R1 every 16 minibatches, path length every 4) is the caller's schedule:
run the ``reg`` phase with ``gain = interval`` and the optimiser settings from
:func:`lazy_regularization`. The signs of the real logits go to ``diffusion.accumulate`` so
that the training loop can adapt p and T with ``diffusion.step``.

Compiled regularisers (``compile_regularizers``): ``torch.autograd.grad(create_graph=True)``
through a compiled module is unsupported (double backward under aot_autograd), so the inner
gradients of R1 (d sum(D) / d D's input) and of path length (d <G(w), noise> / d w) are taken
with ``torch.func.grad`` inside one ``torch.compile``-d function of the network's parameters;
its outputs backpropagate to the parameters like any compiled graph's. Augmentation and
diffusion noise stay eager (they draw from Python-side random streams); the R1 gradient is
carried back through them to the clean image with one eager vector-Jacobian product. The
compilation uses ``fullgraph=True`` so that an op that cannot be traced under torch.func raises
at the first call instead of silently running eagerly. Measured on the CPU, torch 2.14.1: the
reference ops compile (inductor and aot_eager); the Triton ops (interpreted) do not: Dynamo
refuses the custom op under torch.func ("In order to use an autograd.Function with functorch
transforms (vmap, grad, jvp, jacrev, ...), it must override the setup_context staticmethod"),
and routing them through their setup_context autograd.Function instead fails at the nested
backward op ("InternalTorchDynamoError: AttributeError: 'AutogradFunctionContextVariable'
object has no attribute 'proxy'"). Two more routes, tried in session 5 and dropped: giving that
Function's forward an explicit signature gets past Dynamo, and the inner gradient's values are
right, but the compiled graph's output no longer depends on the parameters (Dynamo's
autograd.Function is once-differentiable: R1's gradient would be lost); a Python kernel at the
op's Autograd key that applies the Function fails under torch.func even eagerly
("custom_function_call ... at dispatch key AutogradCPU"). The training model falls back to eager
in that case.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PHASES = ("Gmain", "Greg", "Gboth", "Dmain", "Dreg", "Dboth")
LOSSES = ("stylegan2", "wgan")


def lazy_regularization(lr: float, betas: tuple[float, float], interval: int | None):
    """Adam's (lr, betas) for a main phase when its regulariser runs every ``interval`` steps
    (NVIDIA's ``mb_ratio`` correction)."""
    if not interval:
        return lr, betas
    ratio = interval / (interval + 1)
    return lr * ratio, tuple(beta ** ratio for beta in betas)


class StyleGAN2Loss:
    """Losses and regularisers of StyleGAN2 / Diffusion-GAN (see the module docstring).

    Args:
        G_mapping, G_synthesis: the generator's two halves (``G.mapping``, ``G.synthesis``,
            possibly wrapped in DistributedDataParallel).
        D: discriminator called as ``D(img, c, t)``.
        diffusion: a :class:`batikfast.diffusion.Diffusion` or None (no noise, t = 0).
        augment_pipe: a module applied to images before the noise, or None.
        loss: ``"stylegan2"`` or ``"wgan"``.
        compile_regularizers: None to take R1's and path length's inner gradients eagerly with
            ``torch.autograd.grad``, or keyword arguments for ``torch.compile`` (``{}`` for its
            defaults) to take them with ``torch.func`` inside compiled functions (see the
            module docstring). :meth:`use_eager_regularizer` switches one back to eager.
    """

    def __init__(self, G_mapping, G_synthesis, D, diffusion=None, augment_pipe=None,
                 loss: str = "stylegan2", r1_gamma: float = 1.0, style_mixing_prob: float = 0.9,
                 pl_weight: float = 2.0, pl_batch_shrink: int = 2, pl_decay: float = 0.01,
                 device=None, compile_regularizers: dict | None = None):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if pl_batch_shrink < 1:
            raise ValueError(f"pl_batch_shrink must be >= 1, got {pl_batch_shrink!r}")
        self.G_mapping = G_mapping
        self.G_synthesis = G_synthesis
        self.D = D
        self.diffusion = diffusion
        self.augment_pipe = augment_pipe
        self.loss = loss
        self.r1_gamma = r1_gamma
        self.style_mixing_prob = style_mixing_prob
        self.pl_weight = pl_weight
        self.pl_batch_shrink = pl_batch_shrink
        self.pl_decay = pl_decay
        self.pl_mean = torch.zeros([], device=device)
        self._d_input_grad = self._ws_grad = None
        if compile_regularizers is not None:
            # fullgraph: a graph break inside torch.func.grad would run it eagerly without a word
            options = {"fullgraph": True, **compile_regularizers}
            self._d_input_grad = torch.compile(_input_gradient(D), **options)
            self._ws_grad = torch.compile(_input_gradient(G_synthesis), **options)

    def compiled_regularizers(self) -> tuple[str, ...]:
        """The phases (``"Greg"``, ``"Dreg"``) whose inner gradient runs compiled."""
        return tuple(phase for phase, fn in (("Greg", self._ws_grad), ("Dreg", self._d_input_grad))
                     if fn is not None)

    def use_eager_regularizer(self, phase: str) -> None:
        """Take the inner gradient of ``phase`` (``"Greg"`` or ``"Dreg"``) eagerly from now on."""
        if phase == "Greg":
            self._ws_grad = None
        elif phase == "Dreg":
            self._d_input_grad = None
        else:
            raise ValueError(f"phase must be 'Greg' or 'Dreg', got {phase!r}")

    # -- forward passes -----------------------------------------------------------------------

    def run_G(self, z: torch.Tensor, c: torch.Tensor | None):
        ws = self.run_mapping(z, c)
        return self.G_synthesis(ws), ws

    def run_mapping(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """ws of ``z``, with style mixing."""
        ws = self.G_mapping(z, c)
        if self.style_mixing_prob > 0 and ws.shape[1] > 1:
            # Drawn on the CPU so that no GPU synchronisation is needed to slice.
            if float(torch.rand([])) < self.style_mixing_prob:
                cutoff = int(torch.randint(1, ws.shape[1], []))
                mixed = self.G_mapping(torch.randn_like(z), c, skip_w_avg_update=True)
                ws = torch.cat([ws[:, :cutoff], mixed[:, cutoff:]], dim=1)
        return ws

    def run_D(self, img: torch.Tensor, c: torch.Tensor | None):
        """Augment, noise and discriminate; returns (logits, t)."""
        img, t = self.augment_and_noise(img)
        return self.D(img, c, t), t

    def augment_and_noise(self, img: torch.Tensor):
        """D's input for ``img``: augmented, then noised; returns (image, t)."""
        if self.augment_pipe is not None:
            img = self.augment_pipe(img)
        if self.diffusion is not None:
            img, t = self.diffusion(img)
        else:
            t = torch.zeros([img.shape[0]], dtype=torch.long, device=img.device)
        return img, t

    # -- loss terms ---------------------------------------------------------------------------

    def _generator_loss(self, gen_logits):
        if self.loss == "wgan":
            return -gen_logits
        return F.softplus(-gen_logits)  # -log(sigmoid(D(G(z))))

    def _fake_loss(self, gen_logits):
        if self.loss == "wgan":
            return gen_logits
        return F.softplus(gen_logits)  # -log(1 - sigmoid(D(G(z))))

    def _real_loss(self, real_logits):
        if self.loss == "wgan":
            return -real_logits
        return F.softplus(-real_logits)  # -log(sigmoid(D(x)))

    # -- phases -------------------------------------------------------------------------------

    def accumulate_gradients(self, phase: str, real_img: torch.Tensor, real_c, gen_z: torch.Tensor,
                             gen_c, gain: float = 1.0) -> dict:
        """Compute the losses of ``phase`` and backpropagate them scaled by ``gain``.

        Returns a dict of detached per-sample statistics (losses, penalties, logits) for logging.
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        do_gmain = phase in ("Gmain", "Gboth")
        do_dmain = phase in ("Dmain", "Dboth")
        do_gpl = phase in ("Greg", "Gboth") and self.pl_weight != 0
        do_dr1 = phase in ("Dreg", "Dboth") and self.r1_gamma != 0
        stats = {}

        if do_gmain:
            gen_img, _ = self.run_G(gen_z, gen_c)
            gen_logits, _ = self.run_D(gen_img, gen_c)
            loss_gmain = self._generator_loss(gen_logits)
            loss_gmain.mean().mul(gain).backward()
            stats.update({"scores/fake": gen_logits.detach(), "G/loss": loss_gmain.detach()})

        if do_gpl:
            stats.update(self._path_length(gen_z, gen_c, gain))

        loss_dgen = 0
        if do_dmain:
            with torch.no_grad():
                gen_img, _ = self.run_G(gen_z, gen_c)
            gen_logits, _ = self.run_D(gen_img, gen_c)
            loss_dgen = self._fake_loss(gen_logits)
            loss_dgen.mean().mul(gain).backward()
            stats["scores/fake"] = gen_logits.detach()

        if do_dmain or do_dr1:
            real_img_tmp = real_img.detach().requires_grad_(do_dr1)
            r1_grads = None
            if do_dr1 and self._d_input_grad is not None:
                real_logits, r1_grads = self._compiled_r1_gradient(real_img_tmp, real_c)
            else:
                real_logits, _ = self.run_D(real_img_tmp, real_c)
            if self.diffusion is not None:
                self.diffusion.accumulate(real_logits)
            stats.update({"scores/real": real_logits.detach(),
                          "signs/real": real_logits.detach().sign()})
            total = real_logits * 0
            if do_dmain:
                loss_dreal = self._real_loss(real_logits)
                total = total + loss_dreal
                stats["D/loss"] = (loss_dgen + loss_dreal).detach()
            if do_dr1:
                if r1_grads is None:
                    # R1 w.r.t. the clean real image, through augmentation and diffusion noise.
                    (r1_grads,) = torch.autograd.grad(outputs=[real_logits.sum()],
                                                      inputs=[real_img_tmp], create_graph=True)
                r1_penalty = r1_grads.square().sum(dim=[1, 2, 3])
                loss_dr1 = r1_penalty * (self.r1_gamma / 2)
                total = total + loss_dr1[:, None]
                stats.update({"r1_penalty": r1_penalty.detach(), "D/reg": loss_dr1.detach()})
            total.mean().mul(gain).backward()
        return stats

    def _compiled_r1_gradient(self, real_img, real_c):
        """(logits, d sum(logits) / d real_img) with D's part compiled; the gradient stays
        differentiable with respect to D's parameters."""
        d_input, t = self.augment_and_noise(real_img)
        # Detached: the penalty is differentiated with respect to D's parameters only.
        d_input_grad, logits = self._d_input_grad(*_named_tensors(self.D), d_input.detach(),
                                                  (real_c, t), None)
        if d_input is real_img:
            return logits, d_input_grad
        # One vector-Jacobian product through the eager augmentation and noise carries it back
        # to the clean image; create_graph keeps it differentiable in D's parameters.
        (r1_grads,) = torch.autograd.grad(outputs=[d_input], inputs=[real_img],
                                          grad_outputs=[d_input_grad], create_graph=True)
        return logits, r1_grads

    def _path_length(self, gen_z, gen_c, gain):
        batch = max(gen_z.shape[0] // self.pl_batch_shrink, 1)
        gen_c = gen_c[:batch] if gen_c is not None else None
        gen_ws = self.run_mapping(gen_z[:batch], gen_c)
        synthesis = getattr(self.G_synthesis, "module", self.G_synthesis)  # through DDP
        resolution = synthesis.img_resolution
        # Drawn before the synthesis noise in both paths, so they see the same random numbers.
        pl_noise = torch.randn([batch, synthesis.img_channels, resolution, resolution],
                               device=gen_ws.device) / resolution
        if self._ws_grad is not None:
            pl_grads, gen_img = self._ws_grad(*_named_tensors(self.G_synthesis), gen_ws, (),
                                              pl_noise)
        else:
            gen_img = self.G_synthesis(gen_ws)
            (pl_grads,) = torch.autograd.grad(outputs=[(gen_img * pl_noise).sum()],
                                              inputs=[gen_ws], create_graph=True)
        pl_lengths = pl_grads.square().sum(dim=2).mean(dim=1).sqrt()
        pl_mean = self.pl_mean.to(pl_lengths.device).lerp(pl_lengths.mean(), self.pl_decay)
        self.pl_mean = pl_mean.detach()
        pl_penalty = (pl_lengths - pl_mean).square()
        loss_gpl = pl_penalty * self.pl_weight
        # The zero term keeps every synthesis parameter in the graph (DDP expects gradients).
        (gen_img[:, 0, 0, 0] * 0 + loss_gpl).mean().mul(gain).backward()
        return {"pl_penalty": pl_penalty.detach(), "G/reg": loss_gpl.detach()}

    def state_dict(self) -> dict:
        return {"pl_mean": self.pl_mean.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.pl_mean = state["pl_mean"].to(self.pl_mean.device)


def _named_tensors(module: torch.nn.Module):
    """(parameters, buffers) of ``module`` by name, for ``torch.func.functional_call``."""
    return dict(module.named_parameters()), dict(module.named_buffers())


def _input_gradient(module: torch.nn.Module):
    """``fn(params, buffers, x, args, weights)`` -> ``(d sum(out * weights) / dx, out)`` with
    ``out = module(x, *args)`` (``weights`` None: plain sum), taken with ``torch.func.grad``:
    unlike ``torch.autograd.grad(create_graph=True)`` it compiles, and ``fn``'s outputs are
    differentiable with respect to ``params`` and ``x`` in the caller's autograd."""
    def input_gradient(params, buffers, x, args, weights):
        def total(x):
            out = torch.func.functional_call(module, (params, buffers), (x, *args))
            return (out if weights is None else out * weights).sum(), out

        return torch.func.grad(total, has_aux=True)(x)

    return input_gradient


def make_loss(name: str, G, D, **kwargs) -> StyleGAN2Loss:
    """The loss called ``name`` (``"stylegan2"`` or ``"wgan"``) for a Generator ``G``."""
    return StyleGAN2Loss(G.mapping, G.synthesis, D, loss=name, **kwargs)
