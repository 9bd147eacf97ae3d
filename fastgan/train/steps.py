"""One optimizer step of each training phase, reusable by any loop (and the benchmarks).

``TrainSteps`` holds the models, optimizers, loss and lazy-R1 schedule; its ``g_step``,
``d_step`` and ``r1_step`` each take one optimizer step and return a dict of detached
tensors (and ``Elapsed`` timers with ``timing=True``) without waiting for the device. When a
``torch.distributed`` process group with several ranks is active, gradients are averaged
across ranks (``fastgan.train.distributed.finish_gradients``); every phase also replaces
non-finite gradients.

Each phase is a function of tensors only (latents are drawn by ``sample_z`` before it
starts), so the same code runs eagerly or, with ``cuda_graphs=True``, as a captured CUDA graph
per phase (``fastgan.cuda_graph_step``): its inputs are copied into static tensors and the
graph replays; the returned tensors are then overwritten by the next replay.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time

import torch

from fastgan.cuda_graphs import GraphedStep
from fastgan.regularizers import LazyR1, grad_penalty, r1_r2_penalty
from fastgan.train.distributed import finish_gradients
from fastgan.train.losses import (RELATIVISTIC_LOSSES, check_loss, discriminator_loss,
                                  generator_loss)


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


class Elapsed:
    """The time from its creation to ``stop()`` on ``device``'s timeline, measured without
    waiting for the device: on CUDA two events recorded on the current stream, elsewhere
    ``time.perf_counter`` (CPU work is done when the call returns). ``seconds()`` (or
    ``float()``) waits for the work up to ``stop()``, so read it where waiting is due."""

    def __init__(self, device: torch.device):
        self.device = device
        self._start, self._end = self._mark(), None

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def stop(self) -> "Elapsed":
        self._end = self._mark()
        return self

    def seconds(self) -> float:
        if self._end is None:
            raise RuntimeError("Elapsed.seconds() before stop()")
        if self.device.type != "cuda":
            return self._end - self._start
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1000

    def __float__(self) -> float:
        return self.seconds()


class TrainSteps:
    """The G, D and R1 optimizer steps of a GAN with (lazy) R1, and optionally R2.

    Args:
        G: generator with a ``z_dim`` attribute, ``[N, z_dim] -> images``.
        D: discriminator, ``images -> logits [N, ...]``.
        opt_G, opt_D: their optimizers (for lazy R1, build ``opt_D`` with
            ``lazy_r1.adam_params(lr, betas)``; for CUDA graphs, with ``capturable=True``).
        lazy_r1: ``LazyR1`` schedule, or ``None`` for no R1.
        loss: ``'logistic'`` (non-saturating), ``'hinge'`` or ``'rpgan'`` (relativistic
            pairing: the G step then needs real images too).
        r2_gamma: weight of R2 (the same penalty at generated images), applied whenever R1
            is, with the same lazy schedule and scaling; 0 disables it. R1 and R2 share one
            forward and one double backward (``fastgan.regularizers.r1_r2_penalty``).
        sample_z: ``n -> [n, z_dim]`` latents; default ``torch.randn`` on G's device, in its
            parameters' dtype.
        amp: mixed precision: latents and images enter G and D in bfloat16, so every layer
            computes in bf16 (the layers cast their float32 weights to the activations'
            dtype, as StyleGAN2-ADA does for fp16) while weights, gradients and optimizer
            state stay float32. ``None`` means on for CUDA, off otherwise (bf16 on a CPU works
            but is slow). (``torch.autocast`` is not used: it would run some ops, e.g. the
            generator's pixel norm, in float32 and send the two backends down different
            precisions.)
        timing: add each phase's time (``time_G``, ``time_D``, ``time_R1``) to the returned
            dict as an ``Elapsed``, read in seconds later (reading waits for the device).
        cuda_graphs: run each phase as a CUDA graph (CUDA only; the optimizers must be
            ``capturable``); the first ``graph_warmup`` calls of a phase run eagerly.
    """

    def __init__(self, G, D, opt_G, opt_D, lazy_r1: LazyR1 | None = None,
                 loss: str = "logistic", *, r2_gamma: float = 0.0, sample_z=None,
                 amp: bool | None = None, timing: bool = False, cuda_graphs: bool = False,
                 graph_warmup: int = 3):
        self.G, self.D, self.opt_G, self.opt_D = G, D, opt_G, opt_D
        self.lazy_r1 = lazy_r1 if lazy_r1 is not None else LazyR1(0.0)
        self.loss = check_loss(loss)
        self.r2_gamma = float(r2_gamma)
        if not (math.isfinite(self.r2_gamma) and self.r2_gamma >= 0):
            raise ValueError(f"r2_gamma must be a finite number >= 0, got {r2_gamma}")
        param = next(G.parameters())
        self.device = param.device
        self.sample_z = sample_z or (lambda n: torch.randn(n, G.z_dim, device=param.device,
                                                           dtype=param.dtype))
        self.amp = self.device.type == "cuda" if amp is None else amp
        self.timing = timing
        self.cuda_graphs, self.graph_warmup = cuda_graphs, graph_warmup
        self._graphs: dict[tuple, GraphedStep] = {}
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graphs needs CUDA models, not {self.device}")
            for name, opt in (("opt_G", opt_G), ("opt_D", opt_D)):
                if not all(group.get("capturable", False) for group in opt.param_groups):
                    raise ValueError(f"cuda_graphs needs {name} built with capturable=True "
                                     "(e.g. torch.optim.Adam(..., capturable=True))")

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        """A model input in the compute dtype (bf16 under ``amp``)."""
        return x.to(torch.bfloat16) if self.amp else x

    def _run(self, key: tuple, timer: str, phase, *inputs: torch.Tensor) -> dict:
        """``phase(*inputs)``: eagerly, or as the CUDA graph kept under ``key``; timed."""
        if self.cuda_graphs:
            graphed = self._graphs.get(key)
            if graphed is None:
                static = tuple(t.detach().clone() for t in inputs)
                graphed = self._graphs[key] = GraphedStep(phase, static, self.graph_warmup)
            run = functools.partial(graphed, *inputs)
        else:
            run = functools.partial(phase, *inputs)
        if not self.timing:
            return dict(run())
        elapsed = Elapsed(self.device)
        out = dict(run())
        out[timer] = elapsed.stop()
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

    def _needs_reals_in_g_step(self) -> bool:
        return self.loss in RELATIVISTIC_LOSSES

    def g_step(self, batch_size: int, reals: torch.Tensor | None = None) -> dict:
        """Generator step on ``batch_size`` fresh latents; returns ``{'loss_G'}``. The
        relativistic ``rpgan`` loss also needs ``reals`` (``batch_size`` real images)."""
        z = self.sample_z(batch_size)
        if not self._needs_reals_in_g_step():
            return self._run(("G",), "time_G", self._g_phase, z)
        if reals is None:
            raise ValueError(f"loss {self.loss!r} compares fakes with reals: g_step needs reals")
        return self._run(("G",), "time_G", self._g_phase, z, reals)

    def _g_phase(self, z, reals=None) -> dict:
        with _frozen(self.D):
            fakes = self.G(self._in(z))
            real_logits = None if reals is None else self.D(self._in(reals))
            loss = generator_loss(self.loss, self.D(fakes), real_logits)
            self._update(self.G, self.opt_G, loss)
        return {"loss_G": loss.detach()}

    def d_step(self, reals: torch.Tensor, r1: bool = False) -> dict:
        """Discriminator step on ``reals`` ``[N, C, H, W]`` against ``N`` generated images;
        returns ``{'loss_D'}``.

        With ``r1=True`` the R1 penalty (gamma not scaled by the interval), and R2 when
        ``r2_gamma > 0``, are added to this step's loss, reusing its forward pass (R1 every
        minibatch, StyleGAN2's "Dboth"; R3GAN's R1 + R2), and ``r1``/``loss_r1`` (and ``r2``)
        are returned as in ``r1_step``.
        """
        z = self.sample_z(reals.shape[0])
        return self._run(("D", r1), "time_D", functools.partial(self._d_phase, r1=r1),
                         reals, z)

    def _d_phase(self, reals, z, r1: bool) -> dict:
        with torch.no_grad():
            fakes = self.G(self._in(z))
        if r1 and self.r2_gamma > 0:
            penalty = r1_r2_penalty(self.D, self._in(reals), fakes, self.lazy_r1.gamma,
                                    self.r2_gamma)
            loss = discriminator_loss(self.loss, penalty.real_outputs, penalty.fake_outputs)
            out = {"loss_D": loss.detach(), **self._penalty_row(penalty)}
            self._update(self.D, self.opt_D, loss + penalty.loss)
            return out
        x = self._in(reals).detach().requires_grad_(r1)
        real_logits = self.D(x)
        loss = discriminator_loss(self.loss, real_logits, self.D(fakes))
        out = {"loss_D": loss.detach()}
        if r1:
            penalty = grad_penalty(real_logits, x, self.lazy_r1.gamma)
            loss = loss + penalty.loss
            out.update(r1=penalty.grad_sq_norm.detach().mean(), loss_r1=penalty.loss.detach())
        self._update(self.D, self.opt_D, loss)
        return out

    @staticmethod
    def _penalty_row(penalty) -> dict:
        return {"r1": penalty.r1_grad_sq_norm.detach().mean(),
                "r2": penalty.r2_grad_sq_norm.detach().mean(), "loss_r1": penalty.loss.detach()}

    def r1_step(self, reals: torch.Tensor) -> dict:
        """Discriminator step on the R1 penalty alone at ``reals`` (plus R2 at as many fresh
        fakes when ``r2_gamma > 0``), gammas scaled by the lazy interval; returns
        ``{'r1': mean ||grad_x D||^2, 'loss_r1': the penalty}`` (and ``r2``).

        Every parameter of D takes part in this optimizer step, those R1 gives no gradient
        (the biases of fused layers not followed by a minibatch-stddev layer, the last
        layer's bias: ``fastgan.regularizers.r1_penalty``) with a zero gradient, as in
        StyleGAN2-ADA (whose ``0 * logits`` term does the same): Adam's moments and step
        counts then move alike for the fused and the eager layers."""
        if self.r2_gamma > 0:
            z = self.sample_z(reals.shape[0])
            return self._run(("R1R2",), "time_R1", self._r1_r2_phase, reals, z)
        return self._run(("R1",), "time_R1", self._r1_phase, reals)

    def _r1_phase(self, reals) -> dict:
        penalty = self.lazy_r1.penalty(self.D, self._in(reals))
        self._update(self.D, self.opt_D, penalty.loss, every_parameter=True)
        return {"r1": penalty.grad_sq_norm.detach().mean(), "loss_r1": penalty.loss.detach()}

    def _r1_r2_phase(self, reals, z) -> dict:
        with torch.no_grad():
            fakes = self.G(self._in(z))
        interval = self.lazy_r1.interval
        penalty = r1_r2_penalty(self.D, self._in(reals), fakes, self.lazy_r1.effective_gamma,
                                self.r2_gamma * interval)
        self._update(self.D, self.opt_D, penalty.loss, every_parameter=True)
        return self._penalty_row(penalty)
