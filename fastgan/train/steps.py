"""One optimizer step of each training phase, reusable by any loop (and the benchmarks).

``TrainSteps`` holds the models, optimizers, loss and lazy-R1 schedule; its ``g_step``,
``d_step`` and ``r1_step`` each take one optimizer step and return a dict of detached
tensors (no host synchronization unless ``timing=True``). When a ``torch.distributed``
process group with several ranks is active, gradients are averaged across ranks
(``fastgan.train.distributed.finish_gradients``); every phase also replaces non-finite
gradients.
"""
from __future__ import annotations

import contextlib
import time

import torch

from fastgan.regularizers import LazyR1, grad_penalty
from fastgan.train.distributed import finish_gradients
from fastgan.train.losses import check_loss, discriminator_loss, generator_loss


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """Within this context ``module``'s parameters do not require grad (restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class TrainSteps:
    """The G, D and R1 optimizer steps of a GAN with (lazy) R1.

    Args:
        G: generator with a ``z_dim`` attribute, ``[N, z_dim] -> images``.
        D: discriminator, ``images -> logits [N, ...]``.
        opt_G, opt_D: their optimizers (for lazy R1, build ``opt_D`` with
            ``lazy_r1.adam_params(lr, betas)``).
        lazy_r1: ``LazyR1`` schedule, or ``None`` for no R1.
        loss: ``'logistic'`` (non-saturating) or ``'hinge'``.
        sample_z: ``n -> [n, z_dim]`` latents; default ``torch.randn`` on G's device, in its
            parameters' dtype.
        amp: mixed precision: latents and images enter G and D in bfloat16, so every layer
            computes in bf16 (the layers cast their float32 weights to the activations'
            dtype, as StyleGAN2-ADA does for fp16) while weights, gradients and optimizer
            state stay float32. ``None`` means on for CUDA, off otherwise (bf16 on a CPU works
            but is slow). (``torch.autocast`` is not used: it would run some ops, e.g. the
            generator's pixel norm, in float32 and send the two backends down different
            precisions.)
        timing: synchronize CUDA around each step and add its wall time in seconds
            (``time_G``, ``time_D``, ``time_R1``) to the returned dict.
    """

    def __init__(self, G, D, opt_G, opt_D, lazy_r1: LazyR1 | None = None,
                 loss: str = "logistic", *, sample_z=None, amp: bool | None = None,
                 timing: bool = False):
        self.G, self.D, self.opt_G, self.opt_D = G, D, opt_G, opt_D
        self.lazy_r1 = lazy_r1 if lazy_r1 is not None else LazyR1(0.0)
        self.loss = check_loss(loss)
        param = next(G.parameters())
        self.device = param.device
        self.sample_z = sample_z or (lambda n: torch.randn(n, G.z_dim, device=param.device,
                                                           dtype=param.dtype))
        self.amp = self.device.type == "cuda" if amp is None else amp
        self.timing = timing

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        """A model input in the compute dtype (bf16 under ``amp``)."""
        return x.to(torch.bfloat16) if self.amp else x

    def _timed(self, key: str, phase) -> dict:
        if not self.timing:
            return phase()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = phase()
        sync()
        out[key] = time.perf_counter() - start
        return out

    def _update(self, module, opt, loss, every_parameter: bool = False) -> None:
        """One optimizer step on ``loss``. With ``every_parameter``, parameters the loss left
        without a gradient get zeros, so the optimizer steps them as it steps the others."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if every_parameter:
            for p in module.parameters():
                if p.grad is None and p.requires_grad:
                    p.grad = torch.zeros_like(p)
        finish_gradients(module)
        opt.step()

    def g_step(self, batch_size: int) -> dict:
        """Generator step on ``batch_size`` fresh latents; returns ``{'loss_G'}``."""
        def phase():
            with _frozen(self.D):
                fakes = self.G(self._in(self.sample_z(batch_size)))
                loss = generator_loss(self.loss, self.D(fakes))
                self._update(self.G, self.opt_G, loss)
            return {"loss_G": loss.detach()}
        return self._timed("time_G", phase)

    def d_step(self, reals: torch.Tensor, r1: bool = False) -> dict:
        """Discriminator step on ``reals`` ``[N, C, H, W]`` against ``N`` generated images;
        returns ``{'loss_D'}``.

        With ``r1=True`` the R1 penalty (gamma not scaled by the interval) is added to this
        step's loss, reusing its forward pass on ``reals`` (R1 every minibatch, StyleGAN2's
        "Dboth"), and ``r1``/``loss_r1`` are returned as in ``r1_step``.
        """
        def phase():
            with torch.no_grad():
                fakes = self.G(self._in(self.sample_z(reals.shape[0])))
            x = self._in(reals).detach().requires_grad_(r1)
            real_logits = self.D(x)
            loss = discriminator_loss(self.loss, real_logits, self.D(fakes))
            out = {"loss_D": loss.detach()}
            if r1:
                penalty = grad_penalty(real_logits, x, self.lazy_r1.gamma)
                loss = loss + penalty.loss
                out.update(r1=penalty.grad_sq_norm.detach().mean(),
                           loss_r1=penalty.loss.detach())
            self._update(self.D, self.opt_D, loss)
            return out
        return self._timed("time_D", phase)

    def r1_step(self, reals: torch.Tensor) -> dict:
        """Discriminator step on the R1 penalty alone at ``reals``, gamma scaled by the lazy
        interval; returns ``{'r1': mean ||grad_x D||^2, 'loss_r1': the penalty}``.

        Every parameter of D takes part in this optimizer step, those R1 gives no gradient
        (biases of fused layers, the last layer's bias) with a zero gradient, as in
        StyleGAN2-ADA (whose ``0 * logits`` term does the same): Adam's moments and step
        counts then move alike for the fused and the eager layers."""
        def phase():
            penalty = self.lazy_r1.penalty(self.D, self._in(reals))
            self._update(self.D, self.opt_D, penalty.loss, every_parameter=True)
            return {"r1": penalty.grad_sq_norm.detach().mean(), "loss_r1": penalty.loss.detach()}
        return self._timed("time_R1", phase)
