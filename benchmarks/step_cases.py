"""The training-step cases (docs/design.md section 6): ``r1_step``, ``r1r2_step`` and
``train_iter``.

A discriminator step here is what a training loop runs without its optimizer: the ``.grad``s
cleared, the loss, ``loss.backward()``. Modes:

* ``r1_step`` (a plain conv stack and the resnet D): ``step`` the R1 penalty alone;
  ``step+graph`` that step replayed as one CUDA graph (``fastgan.cuda_graph_step``);
  ``dstep`` the plain D step on the same D (logistic loss on reals and fakes, no penalty), so
  that the rows give "R1 step / plain D step".
* ``r1r2_step`` (R3GAN's D, the RpGAN loss in every step): ``joint`` RpGAN + R1 at the reals +
  R2 at the fakes through one combined batch (one double backward; fastgan:
  ``fastgan.regularizers.r1_r2_penalty``); ``split`` the same with R1 and R2 computed one after
  the other (two forwards, two double backwards: eager as users write it, fastgan
  ``r1_r2_penalty(joint=False)``); ``dstep`` the RpGAN loss alone.
* ``train_iter``: ``iter`` G step + D step per iteration with lazy R1 (``TrainSteps``, Adam
  included); ``iter+graph`` the same with every phase a CUDA graph
  (``TrainSteps(cuda_graphs=True)``, Adam ``capturable=True``).

Graphed rows run for eager and fastgan on CUDA only; they are warmed up and captured before
timing, so every timed call is a replay. Fakes are random images (no generator): a D step sees
fakes detached from G. The ``ext`` provider is for the op cases: its step rows are
``unsupported`` (fastgan's rows run the backend rule, the extension where it picks it).
"""
from __future__ import annotations

import functools

import torch

import fastgan
from benchmarks.common import (CHANNELS_LAST, DTYPES, EXT_OPS_ONLY, BuildContext, Case,
                               Unsupported, compiled, layout_label, pick, randn)
from benchmarks.op_cases import Conv, conv_costs, conv_params, conv_stack
from fastgan import reference
from fastgan.regularizers import r1_penalty, r1_r2_penalty
from fastgan.train.losses import discriminator_loss

R1_GAMMA = 10.0  # R1 (and R2) weight in every penalty case
LAZY_R1_INTERVAL = 16
GRAPH_WARMUP = 3  # eager calls before a graph is captured (fastgan.cuda_graph_step's default)
GRAPH = "+graph"  # the mode suffix of graphed rows


# ---------------------------------------------------------------------------------------
# Losses: the penalties in plain torch (eager, compile) and through fastgan


def eager_input_grad_sq_norm(D, images):
    """``(D(x), ||grad_x sum(D(x))[n]||^2)`` at ``x = images`` in plain torch: one forward and
    one ``autograd.grad`` with ``create_graph`` (a double backward once minimized)."""
    x = images.detach().requires_grad_(True)
    outputs = D(x)
    g, = torch.autograd.grad(outputs.sum(), x, create_graph=True)
    return outputs, reference.grad_sq_norm(g)


def eager_r1_penalty(D, reals, gamma):
    """R1 in plain torch: ``gamma / 2 * mean_n ||grad_x sum(D(x))[n]||^2``, the value of
    ``fastgan.regularizers.r1_penalty(D, reals, gamma).loss``."""
    return eager_input_grad_sq_norm(D, reals)[1].mean() * (gamma / 2)


def _rpgan_plus_penalties(real_outputs, fake_outputs, r1_sq, r2_sq, gamma):
    return (discriminator_loss("rpgan", real_outputs, fake_outputs)
            + (r1_sq.mean() + r2_sq.mean()) * (gamma / 2))


def eager_r1_r2_split_loss(D, reals, fakes, gamma):
    """RpGAN + R1 + R2 as users write it in plain torch: R1 at ``reals``, then R2 at
    ``fakes``, each its own forward and double backward."""
    real_outputs, r1_sq = eager_input_grad_sq_norm(D, reals)
    fake_outputs, r2_sq = eager_input_grad_sq_norm(D, fakes)
    return _rpgan_plus_penalties(real_outputs, fake_outputs, r1_sq, r2_sq, gamma)


def eager_r1_r2_joint_loss(D, reals, fakes, gamma):
    """RpGAN + R1 + R2 in plain torch through one combined batch ``cat([reals, fakes])``: one
    forward, one double backward (valid when no layer of ``D`` mixes samples)."""
    outputs, sq = eager_input_grad_sq_norm(D, torch.cat([reals, fakes]))
    n = reals.shape[0]
    return _rpgan_plus_penalties(outputs[:n], outputs[n:], sq[:n], sq[n:], gamma)


def fastgan_r1_r2_loss(D, reals, fakes, gamma, joint: bool):
    """RpGAN + ``fastgan.regularizers.r1_r2_penalty(D, reals, fakes, gamma, joint=joint)``."""
    penalty = r1_r2_penalty(D, reals, fakes, gamma, joint=joint)
    return discriminator_loss("rpgan", penalty.real_outputs, penalty.fake_outputs) + penalty.loss


def plain_d_loss(loss: str, D, reals, fakes):
    """The D loss ``loss`` (``'logistic'`` or ``'rpgan'``) alone: ``D(reals)``, ``D(fakes)``."""
    return discriminator_loss(loss, D(reals), D(fakes))


# ---------------------------------------------------------------------------------------
# Steps, graphed or not


def step_fn(loss_fn, params):
    """``step(*inputs)``: one D step without the optimizer, as a training loop runs it: the
    ``.grad``s of ``params`` cleared, ``loss_fn(*inputs).backward()``; returns the detached
    loss.

    The first call checks that every weight got a gradient: a double backward that silently
    leaves the weights out (seen with ``torch.compile`` of a whole module under
    ``autograd.grad(penalty, weights)``) must not pass for a fast one.
    """
    weights = [p for p in params if p.ndim >= 2]
    checked = []

    def step(*inputs):
        for p in params:
            p.grad = None
        loss = loss_fn(*inputs)
        loss.backward()
        if not checked:
            missing = sum(w.grad is None for w in weights)
            if missing:
                raise RuntimeError(f"the step left {missing} of {len(weights)} weight tensors "
                                   "without a gradient")
            checked.append(True)
        return loss.detach()
    return step


def check_graphable(provider: str, ctx: BuildContext) -> None:
    if ctx.device.type != "cuda":
        raise Unsupported("CUDA graphs need CUDA: the CPU smoke run cannot capture them")
    if provider == "compile":
        raise Unsupported("graphed rows capture eager and fastgan whole; torch.compile's own "
                          "graphs (mode='reduce-overhead') are not measured")


def timed_step(step, inputs: list, graphed: bool):
    """What the runner times: ``step(*inputs)``; with ``graphed``, a CUDA graph of it
    (``fastgan.cuda_graph_step``) warmed up and captured here, so every timed call replays."""
    if not graphed:
        return functools.partial(step, *inputs)
    graph = fastgan.cuda_graph_step(step, *inputs, warmup=GRAPH_WARMUP)
    for _ in range(GRAPH_WARMUP + 1):
        graph()
    if not graph.captured:
        raise RuntimeError(f"the step was not captured after {GRAPH_WARMUP + 1} calls")
    return graph


def build_d_step(make_d, make_loss, n_inputs: int, image_shape, dtype, mode: str,
                 ctx: BuildContext, provider: str):
    """The timed D step of one (case, provider), graphed when ``mode`` ends in ``+graph``.

    ``make_d(ctx, provider) -> (D, params, channels_last)``: the discriminator, its parameters
    and whether its images are channels_last; ``make_loss(D, provider) -> loss_fn(*images)``;
    the step's inputs are ``n_inputs`` random image batches of ``image_shape`` in ``dtype``.
    """
    if provider == "ext":
        raise Unsupported(EXT_OPS_ONLY)
    graphed = mode.endswith(GRAPH)
    if graphed:
        check_graphable(provider, ctx)
    D, params, channels_last = make_d(ctx, provider)
    images = [randn(image_shape, dtype, ctx.device, channels_last=channels_last,
                    requires_grad=False) for _ in range(n_inputs)]
    return timed_step(step_fn(make_loss(D, provider), params), images, graphed)


# ---------------------------------------------------------------------------------------
# Models: a plain conv stack, and the discriminators of fastgan.models


def _check_model_compile(provider: str, ctx: BuildContext) -> None:
    if provider == "compile" and not ctx.compile_models:
        raise Unsupported("CPU smoke run: torch.compile of whole models is skipped (its CPU "
                          "compile time would dominate the run); GPU runs compile them")


def model_backend(provider: str) -> str:
    """fastgan runs the fused layers; eager and compile the same models in plain torch."""
    return "fastgan" if provider == "fastgan" else "torch"


def _conv_stack_d(layers, dtype, ctx: BuildContext, provider: str):
    """The conv stack as a D: weights in ``dtype`` (NCHW), images channels_last in bf16."""
    params = conv_params(layers, dtype, ctx.device)
    eager = functools.partial(conv_stack, reference.conv2d_act, layers)
    fused = functools.partial(conv_stack, fastgan.conv2d_act, layers)
    fn = pick(provider, eager, fused, ctx)
    return (lambda x: fn(x, *params)), params, CHANNELS_LAST[dtype]


def _model_d(arch: str, res: int, kwargs: dict, ctx: BuildContext, provider: str):
    """``fastgan.models``' D of ``arch`` in float32 (bf16 images make every layer compute in
    bf16, as ``TrainSteps``' amp does); compiled for compile."""
    from fastgan.models import build_discriminator

    _check_model_compile(provider, ctx)
    D = build_discriminator(arch, res, backend=model_backend(provider), **kwargs).to(ctx.device)
    params = list(D.parameters())
    if provider == "compile":
        D = compiled(D, ctx.compile_backend, cache=False)
    return D, params, False


MODEL_AMP_NOTE = ("all", "bf16: images in bf16, float32 parameters cast by each layer "
                         "(TrainSteps' amp)")
GRAPH_NOTE = ("all", "CUDA graph replays of the whole step (fastgan.cuda_graph_step), captured "
                     "before timing; peak memory leaves out the graph's pool")
DSTEP_NOTE = ("all", "plain D step: logistic loss on D(reals) and D(fakes), backward, no penalty")


# ---------------------------------------------------------------------------------------
# r1_step: the R1 step, graphed or not, and the plain D step on the same D


R1_MODES = ("step", "step" + GRAPH, "dstep")


def _r1_loss(mode: str, D, provider: str):
    """The loss of ``mode``: R1 at the reals (fastgan's ``r1_penalty`` or the eager penalty),
    or for ``dstep`` the logistic loss on reals and fakes."""
    if mode == "dstep":
        return functools.partial(plain_d_loss, "logistic", D)
    if provider == "fastgan":
        return lambda reals: r1_penalty(D, reals, R1_GAMMA).loss
    return functools.partial(eager_r1_penalty, D, gamma=R1_GAMMA)


def r1_step_flops(n, res, layers) -> float:
    """At least 4F with F the forward FLOPs: the forward, the input gradient (no weight
    gradient), then the gradient of that input-gradient chain (one conv and one
    weight-gradient conv per layer)."""
    return 4 * conv_costs(n, res, res, layers, torch.float32, "fwd")[1]


def d_step_flops(n, res, layers) -> float:
    """Forward and backward of 2N images (reals and fakes): 3F(2N), less the first layer's
    input gradient (images need none), F1(2N)."""
    total = conv_costs(2 * n, res, res, layers, torch.float32, "fwd+bwd")[1]
    return total - conv_costs(2 * n, res, res, layers[:1], torch.float32, "fwd")[1]


# A plain conv stack in StyleGAN2-256 widths: fromrgb, then conv / stride-2 conv pairs.
R1_STACK = {
    "full": (32, 256, (Conv(3, 128, k=1), Conv(128, 128), Conv(128, 256, stride=2),
                       Conv(256, 256), Conv(256, 512, stride=2), Conv(512, 512),
                       Conv(512, 512, stride=2), Conv(512, 1, k=1, act="linear"))),
    "smoke": (2, 16, (Conv(3, 4, k=1), Conv(4, 4), Conv(4, 8, stride=2), Conv(8, 8),
                      Conv(8, 1, k=1, act="linear"))),
}
# The models of fastgan.models (StyleGAN2 widths by default): (res, batch, model kwargs).
MODEL_SIZES = {
    "full": (256, 32, {}),
    "smoke": (8, 4, {"channel_base": 64, "channel_max": 8}),
}
AMP = {torch.bfloat16: True, torch.float32: False}  # bf16 = TrainSteps' amp, fp32 params


def _mode_notes(mode: str, amp: bool) -> tuple:
    notes = (MODEL_AMP_NOTE,) if amp else ()
    notes += (GRAPH_NOTE,) if mode.endswith(GRAPH) else ()
    return notes + ((DSTEP_NOTE,) if mode == "dstep" else ())


def _r1_cases(label, make_d, image_shape, dtype, amp: bool, flops: dict) -> list[Case]:
    """The ``R1_MODES`` cases of one D; ``flops``: FLOPs by mode, where known."""
    cases = []
    for mode in R1_MODES:
        n_inputs = 2 if mode == "dstep" else 1  # reals (and fakes)
        build = functools.partial(build_d_step, make_d, functools.partial(_r1_loss, mode),
                                  n_inputs, image_shape, dtype, mode)
        cases.append(Case("r1_step", mode, label, dtype, build, None, flops.get(mode),
                          notes=_mode_notes(mode, amp)))
    return cases


def r1_step_cases(size: str) -> list[Case]:
    key = "smoke" if size == "smoke" else "full"
    n, res, layers = R1_STACK[key]
    widths = ">".join(str(layer.cout) for layer in layers[:-1])
    stack_flops = {"step": r1_step_flops(n, res, layers), "step" + GRAPH: r1_step_flops(
        n, res, layers), "dstep": d_step_flops(n, res, layers)}
    model_res, model_n, kwargs = MODEL_SIZES[key]
    cases = []
    for dtype in DTYPES.values():
        label = f"conv-stack {n}x3x{res}x{res} {widths}" + layout_label(dtype)
        cases += _r1_cases(label, functools.partial(_conv_stack_d, layers, dtype),
                           (n, 3, res, res), dtype, False, stack_flops)
    for dtype in DTYPES.values():
        label = f"resnet-D {model_n}x3x{model_res}x{model_res}" + (" amp" if AMP[dtype] else "")
        cases += _r1_cases(label, functools.partial(_model_d, "resnet", model_res, kwargs),
                           (model_n, 3, model_res, model_res), dtype, AMP[dtype], {})
    return cases


# ---------------------------------------------------------------------------------------
# r1r2_step: R3GAN's D step, RpGAN + R1 + R2, joint or split, and RpGAN alone


R1R2_MODES = ("joint", "split", "dstep")
# (res, batch, R3GAN D kwargs): R3GAN's FFHQ-64 and FFHQ-256 discriminators; a tiny one to smoke.
R3GAN_SIZES = {
    "full": [(64, 64, {}), (256, 32, {})],
    "smoke": [(8, 2, {"widths": (16, 16), "blocks": 1, "group_channels": 8})],
}
_PENALTIES = ("all", f"RpGAN loss + R1 at the reals + R2 at the fakes, gamma {R1_GAMMA:g}")
R1R2_NOTES = {
    "joint": (_PENALTIES,
              ("eager", "one forward of cat(reals, fakes), one autograd.grad(create_graph)"),
              ("fastgan", "fastgan.regularizers.r1_r2_penalty (joint pass)")),
    "split": (_PENALTIES,
              ("eager", "R1 then R2 as users write them: two forwards, two double backwards"),
              ("fastgan", "r1_r2_penalty(joint=False): two forwards, two double backwards")),
    "dstep": (("all", "plain D step: RpGAN loss alone, no penalty"),),
}


def _r1r2_loss(mode: str, D, provider: str):
    """The loss of ``mode`` on ``(reals, fakes)``; compile cannot run the penalties."""
    if mode == "dstep":
        return functools.partial(plain_d_loss, "rpgan", D)
    if provider == "fastgan":
        return functools.partial(fastgan_r1_r2_loss, D, gamma=R1_GAMMA, joint=mode == "joint")
    if provider == "compile":
        raise Unsupported("torch.compile cannot run R1/R2's double backward (r1_step's compile "
                          "rows record the error); not attempted here")
    eager = eager_r1_r2_joint_loss if mode == "joint" else eager_r1_r2_split_loss
    return functools.partial(eager, D, gamma=R1_GAMMA)


def r1r2_step_cases(size: str) -> list[Case]:
    cases = []
    for dtype in DTYPES.values():
        for res, n, kwargs in R3GAN_SIZES["smoke" if size == "smoke" else "full"]:
            label = f"r3gan-D {n}x3x{res}x{res} +{n} fakes" + (" amp" if AMP[dtype] else "")
            make_d = functools.partial(_model_d, "r3gan", res, kwargs)
            for mode in R1R2_MODES:
                build = functools.partial(build_d_step, make_d,
                                          functools.partial(_r1r2_loss, mode), 2,
                                          (n, 3, res, res), dtype, mode)
                notes = R1R2_NOTES[mode] + ((MODEL_AMP_NOTE,) if AMP[dtype] else ())
                cases.append(Case("r1r2_step", mode, label, dtype, build, None, None,
                                  notes=notes))
    return cases


# ---------------------------------------------------------------------------------------
# train_iter: G step + D step per iteration, lazy R1 every LAZY_R1_INTERVAL iterations


TRAIN_ITER_MODES = ("iter", "iter" + GRAPH)


def _check_amp(dtype, ctx: BuildContext) -> bool:
    if AMP[dtype] and ctx.device.type == "cpu":
        raise Unsupported("CPU smoke run: bf16 training iterations are skipped (bf16 runs "
                          "slowly on a CPU); GPU runs measure them")
    return AMP[dtype]


def _build_train_iter(res, n, kwargs, dtype, mode, ctx: BuildContext, provider: str):
    """``fastgan.train.steps.TrainSteps`` on the generator and resnet D of ``fastgan.models``;
    one call runs LAZY_R1_INTERVAL iterations (G step, D step) and one R1 step. For compile,
    G and D are compiled for the G and D steps and the R1 step runs the uncompiled D (same
    parameters and optimizer): torch.compile cannot run R1's double backward. Graphed: every
    phase is captured before this returns."""
    from fastgan.models import build_discriminator, build_generator
    from fastgan.regularizers import LazyR1
    from fastgan.train.steps import TrainSteps

    if provider == "ext":
        raise Unsupported(EXT_OPS_ONLY)
    graphed = mode.endswith(GRAPH)
    if graphed:
        check_graphable(provider, ctx)
    amp = _check_amp(dtype, ctx)
    _check_model_compile(provider, ctx)
    backend = model_backend(provider)
    G = build_generator(res, backend=backend, **kwargs).to(ctx.device)
    D = build_discriminator("resnet", res, backend=backend, **kwargs).to(ctx.device)
    lazy_r1 = LazyR1(R1_GAMMA, LAZY_R1_INTERVAL)
    # On meta tensors (--count) Adam runs as on CUDA: torch picks foreach for CUDA only.
    adam = dict(capturable=graphed, foreach=True if ctx.device.type == "meta" else None)
    opt_G = torch.optim.Adam(G.parameters(), lr=0.0025, betas=(0.0, 0.99), **adam)
    lr_D, betas_D = lazy_r1.adam_params(0.0025, (0.0, 0.99))
    opt_D = torch.optim.Adam(D.parameters(), lr=lr_D, betas=betas_D, **adam)
    r1_steps = TrainSteps(G, D, opt_G, opt_D, lazy_r1, amp=amp, cuda_graphs=graphed,
                          graph_warmup=GRAPH_WARMUP)
    steps = r1_steps
    if provider == "compile":
        steps = TrainSteps(compiled(G, ctx.compile_backend, cache=False),
                           compiled(D, ctx.compile_backend, cache=False), opt_G, opt_D,
                           lazy_r1, amp=amp)
    sets = [randn((n, 3, res, res), dtype, ctx.device, requires_grad=False) for _ in range(2)]
    if graphed:
        for _ in range(GRAPH_WARMUP + 1):  # warm up and capture each phase
            steps.g_step(n)
            steps.d_step(sets[0])
            r1_steps.r1_step(sets[0])

    def block():
        for i in range(LAZY_R1_INTERVAL):
            reals = sets[i % len(sets)]
            steps.g_step(n)
            steps.d_step(reals)
            if lazy_r1.due(i):
                r1_steps.r1_step(reals)
    return block


TRAIN_ITER_NOTES = (
    ("all", f"time per iteration of a {LAZY_R1_INTERVAL}-iteration block (G step + D step each, "
            "one R1 step), timed block by block"),
    ("eager", "TrainSteps' R1 reduces with fastgan.grad_sq_norm for every backend"),
    ("compile", "G and D compiled for the G and D steps; R1 runs the uncompiled D (no double "
                "backward in torch.compile); TrainSteps' R1 reduces with fastgan.grad_sq_norm"),
)
TRAIN_ITER_GRAPH_NOTE = ("all", "every phase (G, D, R1) a CUDA graph (TrainSteps(cuda_graphs="
                                "True)), Adam capturable=True; peak memory leaves out the "
                                "graphs' pools")


def train_iter_cases(size: str) -> list[Case]:
    res, n, kwargs = MODEL_SIZES["smoke" if size == "smoke" else "full"]
    dtypes = [torch.bfloat16] if size == "quick" else list(DTYPES.values())
    cases = []
    for dtype in dtypes:
        label = f"G+resnet-D {n}x3x{res}x{res} r1/{LAZY_R1_INTERVAL}"
        label += " amp" if AMP[dtype] else ""
        for mode in TRAIN_ITER_MODES:
            build = functools.partial(_build_train_iter, res, n, kwargs, dtype, mode)
            notes = TRAIN_ITER_NOTES + ((TRAIN_ITER_GRAPH_NOTE,) if mode.endswith(GRAPH) else ())
            cases.append(Case("train_iter", mode, label, dtype, build, None, None,
                              calls_per_unit=LAZY_R1_INTERVAL, notes=notes))
    return cases
