"""The per-problem choice between the Triton kernels and the compiled extension for bias_act and
grad_sq_norm under backend ``auto`` (fastgan.ops.choice.OpChoices, docs/design.md
section 8), on CPU: both implementations run CPU tensors here (the Triton interpreter, the
extension's CPU kernels), so the rule is pointed at CPU tensors and measuring is replaced by
stand-in timings. tests/test_gpu_ops.py times the real thing on CUDA."""
import json

import pytest
import torch

import fastgan
from fastgan import backend, reference
from fastgan.ops import choice
from fastgan.ops.choice import Problem, op_key
from op_helpers import assert_matches, leaf, randn
from test_ext import require_ext

pytestmark = pytest.mark.skipif(not backend.interpreter_enabled(), reason="needs the Triton "
                                "interpreter for CPU tensors; tests/test_gpu_ops.py runs CUDA")

KERNELS = ("bias_act", "bias_act_grad", "per_sample_dot", "scale_per_sample")
# The launch each implementation of a kernel records: Triton's kernel name, or ext_<op>.
LAUNCH = {**{(k, "triton"): k for k in KERNELS}, **{(k, "ext"): f"ext_{k}" for k in KERNELS},
          ("bias_act", "triton"): "bias_act_fwd"}
KERNEL_OF = {name: kernel for (kernel, _), name in LAUNCH.items()}
PATH_OF = {name: path for (_, path), name in LAUNCH.items()}
# The order in which one _run_ops() meets the kernels: forward, then the backward.
ORDER = ("bias_act", "per_sample_dot", "scale_per_sample", "bias_act_grad")


@pytest.fixture(autouse=True)
def timed_on_cpu(monkeypatch):
    """Backend auto with the rule's 'timed' outcome for CPU tensors, no cache file, no
    decisions held, and the environment part of the problem names fixed."""
    require_ext()
    monkeypatch.delenv("FASTGAN_BACKEND", raising=False)
    monkeypatch.delenv("FASTGAN_CONV", raising=False)
    monkeypatch.delenv("FASTGAN_CONV_CACHE", raising=False)
    monkeypatch.setattr(backend, "_measured", lambda device_type: device_type == "cpu")
    monkeypatch.setattr(choice, "environment", lambda index: f"<device {index}>")
    choice.clear_choices()
    yield
    choice.clear_choices()


class StandIn:
    """Replaces measuring: runs the candidate once, names it by the one launch it recorded,
    keeps its output, and returns ``times[name] = (gpu_ms, host_ms)``."""

    def __init__(self, monkeypatch, times):
        self.times, self.measured, self.outputs = times, [], {}
        monkeypatch.setattr(choice, "_measure", self)

    def __call__(self, run, device):
        before = fastgan.launch_counts()
        out = run()
        after = fastgan.launch_counts()
        name, = [k for k in after if after[k] != before.get(k, 0)]
        assert after[name] == before.get(name, 0) + 1
        self.measured.append(name)
        self.outputs.setdefault(KERNEL_OF[name], {})[PATH_OF[name]] = out
        return self.times[name]


def winners_times(winners, loser_ms=(2.0, 2.0), winner_ms=(1.0, 1.0)):
    """Stand-in times where ``winners[kernel]`` ('triton' or 'ext') is faster."""
    return {LAUNCH[kernel, path]: winner_ms if winners[kernel] == path else loser_ms
            for kernel in KERNELS for path in ("triton", "ext")}


def launches_of(winners):
    """The exact launch counts of one _run_ops() when ``winners`` run."""
    return {LAUNCH[kernel, winners[kernel]]: 1 for kernel in KERNELS}


def _run_ops(shape=(2, 3, 4), ops=fastgan, seed=70):
    """bias_act then grad_sq_norm, forward and backward: the outputs and gradients."""
    x = leaf(randn(*shape, seed=seed, device="cpu"))
    b = leaf(randn(shape[1], seed=seed + 1, device="cpu"))
    y = ops.bias_act(x, b, 1, "lrelu", clamp=1.0)
    n = ops.grad_sq_norm(y)
    dx, db = torch.autograd.grad(n.sum(), (x, b))
    return y.detach(), n.detach(), dx, db


def assert_reference_results(got, shape=(2, 3, 4), seed=70):
    for a, b in zip(got, _run_ops(shape, reference, seed)):
        assert_matches(a, b)


def choices(op):
    return fastgan.backend_info()[f"{op}_choices"]["choices"]


ALL_TRITON = dict.fromkeys(KERNELS, "triton")
ALL_EXT = dict.fromkeys(KERNELS, "ext")
MIXED = {"bias_act": "triton", "bias_act_grad": "ext", "per_sample_dot": "ext",
         "scale_per_sample": "triton"}


@pytest.mark.parametrize("winners", [ALL_TRITON, ALL_EXT, MIXED], ids=["triton", "ext", "mixed"])
def test_each_kernel_runs_the_implementation_measured_faster(winners, monkeypatch, launches):
    """The first call of each kernel times both implementations once; every call runs the
    faster one (exact launch counts), and the results are the reference's."""
    stand_in = StandIn(monkeypatch, winners_times(winners))
    assert_reference_results(_run_ops())
    assert stand_in.measured == [LAUNCH[k, p] for k in ORDER for p in ("triton", "ext")]
    fastgan.reset_launch_counts()
    assert_reference_results(_run_ops())
    assert launches() == launches_of(winners)
    assert len(stand_in.measured) == 8  # decided once, held in memory
    # Both candidates of each kernel computed the same thing.
    for kernel, outs in stand_in.outputs.items():
        for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in outs.values())):
            assert_matches(a, b)


def test_backend_info_lists_each_problem_with_its_measurements(monkeypatch):
    StandIn(monkeypatch, winners_times(MIXED, loser_ms=(2.0, 0.5), winner_ms=(1.0, 3.0)))
    _run_ops()
    info = fastgan.backend_info()
    assert info["cpu_tensors"].startswith("Triton kernels or the compiled extension")
    assert info["cpu_extension"].startswith("in use where it measured faster")
    report = info["bias_act_choices"]
    assert (report["mode"], report["cache_file"], report["graph_mode"],
            report["untimed_path"]) == ("auto", None, False, "triton")
    assert report["choices"] == {
        "bias_act float64 channels outer numel 2^4..2^5 every rank | <device -1>": {
            "eager": "ext", "graph": "triton", "source": "timed",
            "gpu_ms": {"triton": 1.0, "ext": 2.0}, "host_ms": {"triton": 3.0, "ext": 0.5}},
        "bias_act_grad float64 channels outer numel 2^4..2^5 db every rank | <device -1>": {
            "eager": "triton", "graph": "ext", "source": "timed",
            "gpu_ms": {"triton": 2.0, "ext": 1.0}, "host_ms": {"triton": 0.5, "ext": 3.0}}}
    assert sorted(choices("grad_sq_norm")) == [
        "per_sample_dot float64 contiguous numel 2^4..2^5 a.a every rank | <device -1>",
        "scale_per_sample float64 contiguous numel 2^4..2^5 every rank | <device -1>"]
    assert choices("conv2d_act") == {}


def test_size_buckets_are_decided_separately(monkeypatch, launches):
    """A bucket is decided by its first call: a later size in the same bucket reuses it, a
    size in another bucket is timed."""
    stand_in = StandIn(monkeypatch, winners_times(ALL_TRITON))
    _run_ops((2, 3, 4))                    # 24 elements: bucket 2^4..2^5
    stand_in.times = winners_times(ALL_EXT)
    _run_ops((2, 3, 5))                    # 30: the same bucket, nothing timed
    assert len(stand_in.measured) == 8
    _run_ops((4, 8, 16, 16))               # 8192: bucket 2^13..2^14, timed
    assert len(stand_in.measured) == 16
    for shape, winners in [((2, 3, 5), ALL_TRITON), ((4, 8, 16, 16), ALL_EXT),
                           ((2, 3, 4), ALL_TRITON), ((4, 8, 16, 17), ALL_EXT)]:
        fastgan.reset_launch_counts()
        assert_reference_results(_run_ops(shape), shape)
        assert launches() == launches_of(winners), shape
    assert len(stand_in.measured) == 16


def test_graph_mode_takes_the_smallest_gpu_time(monkeypatch, launches):
    """Eager calls pay max(gpu, host): the extension here; calls in graph_mode() only the GPU
    time: Triton. A kernel first met in graph mode is timed once for both modes."""
    times = {name: (2.0, 0.5) if PATH_OF[name] == "ext" else (1.0, 3.0) for name in PATH_OF}
    stand_in = StandIn(monkeypatch, times)
    with choice.graph_mode():
        _run_ops()
        fastgan.reset_launch_counts()
        _run_ops()
        assert launches() == launches_of(ALL_TRITON)
    fastgan.reset_launch_counts()
    assert_reference_results(_run_ops())
    assert launches() == launches_of(ALL_EXT)
    assert len(stand_in.measured) == 8


@pytest.mark.parametrize("how, value, counts", [
    ("env", "triton", launches_of(ALL_TRITON)), ("set_backend", "triton", launches_of(ALL_TRITON)),
    ("env", "ext", launches_of(ALL_EXT)), ("set_backend", "ext", launches_of(ALL_EXT)),
    ("set_backend", "torch", {})])
def test_forced_backends_bypass_the_measurement(how, value, counts, monkeypatch, launches):
    stand_in = StandIn(monkeypatch, winners_times(MIXED))
    if how == "env":
        monkeypatch.setenv("FASTGAN_BACKEND", value)
    else:
        fastgan.set_backend(value)
    assert_reference_results(_run_ops())
    assert launches() == counts
    assert stand_in.measured == []
    assert choices("bias_act") == choices("grad_sq_norm") == {}
    assert fastgan.backend_info()["bias_act_choices"]["mode"] == value


def test_rule_says_timed_only_for_auto_with_both_implementations(monkeypatch):
    """'timed' needs backend auto, the Triton kernels and the extension for the device; while
    torch.compile traces the rule stays the extension."""
    assert backend.implementation(torch.empty(1)) == "timed"
    assert backend._choose("cpu", compiling=True, warn=False) == "ext"
    fastgan.set_backend("triton")
    assert backend.implementation(torch.empty(1)) == "triton"
    fastgan.set_backend(None)
    monkeypatch.setattr(backend, "_measured", lambda device_type: False)
    assert backend.implementation(torch.empty(1)) == "triton"


def test_capture_runs_triton_untimed_and_says_so(monkeypatch, launches):
    stand_in = StandIn(monkeypatch, winners_times(ALL_EXT))
    with monkeypatch.context() as capturing:
        capturing.setattr(torch.cuda, "is_available", lambda: True)
        capturing.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert_reference_results(_run_ops())
    assert launches() == launches_of(ALL_TRITON)
    assert stand_in.measured == []
    fastgan.reset_launch_counts()
    _run_ops()  # kept for the process: the same on every rank
    assert launches() == launches_of(ALL_TRITON) and stand_in.measured == []
    entries = {**choices("bias_act"), **choices("grad_sq_norm")}
    assert len(entries) == 4
    for entry in entries.values():
        assert entry["source"] == "untimed" and "CUDA graph capture" in entry["reason"]
        assert (entry["eager"], entry["graph"]) == ("triton", "triton")


def test_empty_tensors_are_not_timed(monkeypatch, launches):
    stand_in = StandIn(monkeypatch, winners_times(ALL_EXT))
    x = leaf(randn(0, 3, 4, device="cpu"))
    y = fastgan.bias_act(x, None, 1)
    assert y.shape == (0, 3, 4) and fastgan.grad_sq_norm(y).shape == (0,)
    assert stand_in.measured == [] and launches() == {}


def test_key_separates_what_changes_the_answer():
    x = randn(2, 3, 4, device="cpu")

    def key(kernel="bias_act", x=x, layout="channels outer", variant="", shared=True):
        return op_key(kernel, x, layout, variant, shared)

    base = key()
    assert base == ("bias_act", -1, torch.float64, "channels outer", 5, "", True)
    variants = [key("bias_act_grad"), key(x=x.float()), key(layout="channels innermost"),
                key(variant="db"), key(shared=False), key(x=randn(2, 3, 6, device="cpu")),
                key(x=randn(2, 3, 2, device="cpu"))]
    assert len({base, *variants}) == len(variants) + 1
    for same_bucket in [(16,), (31,), (2, 3, 5), (1, 16)]:
        assert key(x=randn(*same_bucket, device="cpu")) == base


def test_layout_classes_and_variants_in_the_keys(monkeypatch):
    """channels_last bias_act has its channels innermost; a per_sample_dot of two tensors and
    a call without gradients are problems of their own."""
    StandIn(monkeypatch, winners_times(ALL_TRITON))
    x = randn(2, 3, 4, 4, device="cpu").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fastgan.bias_act(x, None, 1)
        fastgan.grad_sq_norm(x)
    from fastgan.ops.grad_sq_norm import PerSampleDot
    PerSampleDot.apply(x, x + 1)
    assert sorted(choices("bias_act")) == [
        "bias_act float64 channels innermost numel 2^6..2^7 maybe one rank | <device -1>"]
    assert sorted(choices("grad_sq_norm")) == [
        "per_sample_dot float64 strided numel 2^6..2^7 a.a maybe one rank | <device -1>",
        "per_sample_dot float64 strided numel 2^6..2^7 a.b every rank | <device -1>"]


def test_several_ranks_rank_0_broadcasts_and_calls_without_gradients_are_untimed(monkeypatch):
    """With two ranks (stand-in collectives): rank 0 times the calls with gradients and
    broadcasts each answer; a call without gradients is not timed and makes no collective."""
    stand_in = StandIn(monkeypatch, winners_times(ALL_EXT))
    sent = []
    monkeypatch.setattr(choice, "_world_size", lambda: 2)
    monkeypatch.setattr(choice.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(choice.dist, "broadcast_object_list",
                        lambda box, src: sent.append((dict(box[0]), src)))
    with torch.no_grad():
        fastgan.bias_act(randn(2, 3, 4, device="cpu"), None, 1)
    entry, = choices("bias_act").values()
    assert entry["source"] == "untimed" and entry["reason"].startswith("2 ranks and a call not known")
    assert sent == [] and stand_in.measured == []
    _run_ops()
    assert len(sent) == 4 and {src for _, src in sent} == {0}
    assert [e["eager"] for e, _ in sent] == ["ext"] * 4 and len(stand_in.measured) == 8


def test_other_ranks_take_rank_0s_answer(monkeypatch, launches):
    stand_in = StandIn(monkeypatch, winners_times(ALL_TRITON))
    answer = {"eager": "ext", "graph": "triton", "gpu_ms": {"triton": 1.0, "ext": 1.0},
              "host_ms": {"triton": 1.0, "ext": 1.0}}
    monkeypatch.setattr(choice, "_world_size", lambda: 2)
    monkeypatch.setattr(choice.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(choice.dist, "broadcast_object_list",
                        lambda box, src: box.__setitem__(0, answer))
    assert_reference_results(_run_ops())
    assert launches() == launches_of(ALL_EXT) and stand_in.measured == []
    assert {e["source"] for e in choices("bias_act").values()} == {"rank 0"}


def test_a_call_made_while_another_problem_is_timed_decides_nothing(monkeypatch, launches):
    """conv2d_act's cudnn candidate calls bias_act: while it is timed, bias_act runs Triton
    and is not decided; the next real call decides it (the same order on every rank)."""
    stand_in = StandIn(monkeypatch, winners_times(ALL_EXT))
    measured_conv = []

    def measure(run, device):
        run()
        measured_conv.append(1)
        return (1.0, 1.0)

    monkeypatch.setattr(choice, "_measure", measure)
    x = randn(2, 3, 4, device="cpu")
    problem = Problem("conv", x.device, lambda: {
        path: (lambda: fastgan.bias_act(x, None, 1)) for path in choice.PATHS}, True)
    assert choice.decide(("conv",), problem) == "triton"
    assert launches() == {"bias_act_fwd": 3} and len(measured_conv) == 3
    assert choices("bias_act") == {}
    monkeypatch.setattr(choice, "_measure", stand_in)
    fastgan.reset_launch_counts()
    fastgan.bias_act(x, None, 1)
    assert stand_in.measured == ["bias_act_fwd", "ext_bias_act"]
    assert len(choices("bias_act")) == 1


def test_cache_file_keeps_the_op_choices(tmp_path, monkeypatch, launches):
    path = tmp_path / "choices.json"
    monkeypatch.setenv("FASTGAN_CONV_CACHE", str(path))
    stand_in = StandIn(monkeypatch, winners_times(MIXED))
    _run_ops()
    saved = json.loads(path.read_text())
    assert len(saved) == 4
    name = "bias_act float64 channels outer numel 2^4..2^5 every rank | <device -1>"
    assert saved[name] == {"eager": "triton", "graph": "triton",
                           "gpu_ms": {"triton": 1.0, "ext": 2.0},
                           "host_ms": {"triton": 1.0, "ext": 2.0}}
    choice.clear_choices()  # a new process: memory empty, the file read again
    fastgan.reset_launch_counts()
    assert_reference_results(_run_ops())
    assert launches() == launches_of(MIXED) and len(stand_in.measured) == 8
    assert {e["source"] for e in choices("grad_sq_norm").values()} == {"file"}
