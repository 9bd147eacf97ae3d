"""The per-problem choice of conv2d_act's implementation (fastgan.ops.choice), on CPU:
stand-in timings, the cache file, two gloo ranks, capture, and conv2d_act's routing."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton

import fastgan
from fastgan import reference
from fastgan.backend import interpreter_enabled
from fastgan.ops import conv2d_act as conv_mod
from fastgan.ops import choice
from fastgan.ops.choice import PATHS, Problem

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.delenv("FASTGAN_CONV", raising=False)
    monkeypatch.delenv("FASTGAN_CONV_CACHE", raising=False)
    choice.clear_choices()
    yield
    choice.clear_choices()


def _stand_in_timings(monkeypatch, times):
    """Make measuring return ``times[path] = (gpu_ms, host_ms)``; returns the list of the paths
    measured, in order."""
    measured = []

    def measure(run, device):
        path = run()
        measured.append(path)
        return times[path]

    monkeypatch.setattr(choice, "_measure", measure)
    return measured


def _problem(name="p", shared=True):
    """A problem whose candidates return their own path name."""
    return Problem(name, torch.device("cpu"),
                   lambda: {path: (lambda path=path: path) for path in PATHS}, shared)


def _entries():
    return fastgan.backend_info()["conv2d_act_choices"]["choices"]


def test_eager_pays_the_larger_of_gpu_and_host_time_a_graph_only_gpu_time(monkeypatch):
    measured = _stand_in_timings(monkeypatch, {"triton": (1.0, 3.0), "cudnn": (2.0, 0.5),
                                               "plain": (2.5, 2.5)})
    assert choice.cached_path(("k",)) is None
    assert choice.decide(("k",), _problem()) == "cudnn"  # max: 3.0, 2.0, 2.5
    assert choice.cached_path(("k",)) == "cudnn"
    with choice.graph_mode():
        assert choice.cached_path(("k",)) == "triton"    # gpu: 1.0, 2.0, 2.5
    assert choice.cached_path(("k",)) == "cudnn"
    assert measured == list(PATHS)  # each candidate measured once
    assert _entries() == {"p": {
        "eager": "cudnn", "graph": "triton", "source": "timed",
        "gpu_ms": {"triton": 1.0, "cudnn": 2.0, "plain": 2.5},
        "host_ms": {"triton": 3.0, "cudnn": 0.5, "plain": 2.5}}}


def test_plain_wins_where_it_is_cheapest_and_ties_go_to_the_first_path(monkeypatch):
    _stand_in_timings(monkeypatch, {"triton": (1.0, 2.0), "cudnn": (1.5, 1.5),
                                    "plain": (0.9, 1.2)})
    assert choice.decide(("plain",), _problem("a")) == "plain"
    with choice.graph_mode():
        assert choice.cached_path(("plain",)) == "plain"
    _stand_in_timings(monkeypatch, {path: (1.0, 1.0) for path in PATHS})
    assert choice.decide(("tie",), _problem("b")) == "triton"


def test_a_problem_met_in_graph_mode_is_timed_once_for_both_modes(monkeypatch):
    measured = _stand_in_timings(monkeypatch, {"triton": (1.0, 3.0), "cudnn": (2.0, 0.5),
                                               "plain": (2.5, 2.5)})
    with choice.graph_mode(), choice.graph_mode():
        assert choice.decide(("k",), _problem()) == "triton"
    assert choice.decide(("k",), _problem()) == "cudnn"
    assert measured == list(PATHS)
    with pytest.raises(KeyError), choice.graph_mode():
        raise KeyError  # the count is restored on errors too
    assert choice.cached_path(("k",)) == "cudnn"


@pytest.mark.parametrize("raw, path", [("plain", "plain"), (" CUDNN ", "cudnn"),
                                       ("Triton", "triton")])
def test_forced_path_wins_over_decisions(raw, path, monkeypatch):
    monkeypatch.setenv("FASTGAN_CONV", raw)
    assert choice.forced_path() == path
    monkeypatch.setenv("FASTGAN_CONV", "")
    assert choice.forced_path() == "auto"
    monkeypatch.setenv("FASTGAN_CONV", "fastest")
    with pytest.raises(ValueError, match="FASTGAN_CONV must be 'auto', 'triton', 'cudnn' or "
                                         "'plain', got 'fastest'"):
        choice.forced_path()


def test_cache_file_decides_known_problems_and_keeps_new_ones(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    known = {"gpu_ms": {"triton": 3.0, "cudnn": 1.0, "plain": 2.0},
             "host_ms": {"triton": 0.1, "cudnn": 0.1, "plain": 0.1}, "eager": "triton"}
    path.write_text(json.dumps({
        "known": known,
        "no plain": {"gpu_ms": {"triton": 1.0, "cudnn": 2.0},
                     "host_ms": {"triton": 1.0, "cudnn": 2.0}},
        "not a number": dict(known, gpu_ms=dict(known["gpu_ms"], plain="fast")),
        "negative": dict(known, host_ms=dict(known["host_ms"], cudnn=-1.0)),
        "path only": {"path": "cudnn"}}))
    monkeypatch.setenv("FASTGAN_CONV_CACHE", str(path))
    measured = _stand_in_timings(monkeypatch, {"triton": (1.0, 1.0), "cudnn": (3.0, 3.0),
                                               "plain": (2.0, 2.0)})
    # The answers come from the measurements, not from a stored "eager".
    assert choice.decide(("known",), _problem("known")) == "cudnn"
    assert measured == []
    for i, name in enumerate(["no plain", "not a number", "negative", "path only", "new"]):
        assert choice.decide((name,), _problem(name)) == "triton"
        assert len(measured) == 3 * (i + 1)  # invalid entries are timed again
    saved = json.loads(path.read_text())
    assert saved["known"] == known
    assert saved["new"] == {"eager": "triton", "graph": "triton",
                            "gpu_ms": {"triton": 1.0, "cudnn": 3.0, "plain": 2.0},
                            "host_ms": {"triton": 1.0, "cudnn": 3.0, "plain": 2.0}}
    assert _entries()["known"]["source"] == "file" and _entries()["new"]["source"] == "timed"

    choice.clear_choices()  # a new process: memory empty, the file read again
    assert choice.decide(("new",), _problem("new")) == "triton"
    assert len(measured) == 15 and _entries()["new"]["source"] == "file"
    assert fastgan.backend_info()["conv2d_act_choices"]["cache_file"] == str(path)


def test_cache_file_merges_atomically(tmp_path):
    path = tmp_path / "sub" / "choices.json"
    choice.write_cache_file(str(path), "a", {"eager": "triton"})
    choice.write_cache_file(str(path), "b", {"eager": "cudnn"})
    assert choice.read_cache_file(str(path)) == {"a": {"eager": "triton"},
                                                      "b": {"eager": "cudnn"}}
    assert [p.name for p in path.parent.iterdir()] == ["choices.json"]  # no temp file left
    path.write_text("{not json")
    assert choice.read_cache_file(str(path)) == {}


def test_cache_file_setting_is_read_per_value(tmp_path, monkeypatch):
    assert choice.cache_file() is None
    monkeypatch.setenv("FASTGAN_CONV_CACHE", " ~/choices.json ")
    assert choice.cache_file() == os.path.expanduser("~/choices.json")
    monkeypatch.setenv("FASTGAN_CONV_CACHE", str(tmp_path / "other.json"))
    assert choice.cache_file() == str(tmp_path / "other.json")


def test_nothing_is_timed_during_capture(monkeypatch):
    measured = _stand_in_timings(monkeypatch, {path: (1.0, 1.0) for path in PATHS})
    with monkeypatch.context() as capturing:
        capturing.setattr(torch.cuda, "is_available", lambda: True)
        capturing.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        with choice.graph_mode():
            assert choice.decide(("k",), _problem()) == "triton"
    assert choice.cached_path(("k",)) == "triton"  # kept: the same on every rank
    assert measured == []
    entry = _entries()["p"]
    assert entry["source"] == "untimed" and "CUDA graph capture" in entry["reason"]
    assert (entry["eager"], entry["graph"]) == ("triton", "triton")
    assert fastgan.backend_info()["conv2d_act_choices"]["untimed_path"] == "triton"


def test_a_call_without_gradients_is_timed_in_one_process(monkeypatch):
    measured = _stand_in_timings(monkeypatch, {"triton": (2.0, 2.0), "cudnn": (1.0, 1.0),
                                               "plain": (3.0, 3.0)})
    assert choice.decide(("k",), _problem(shared=False)) == "cudnn"
    assert measured == list(PATHS)


# Rank RANK of 2 (gloo, file store STORE): rank 0 measures stand-in timings, rank 1 must not
# measure. Prints one JSON line: what each decision returned, and the sources.
RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from fastgan.ops import choice
    from fastgan.ops.choice import PATHS, Problem

    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    times = {"first": {"triton": (2.0, 2.0), "cudnn": (1.0, 3.0), "plain": (3.0, 3.0)},
             "third": {"triton": (2.0, 2.0), "cudnn": (3.0, 3.0), "plain": (1.0, 1.0)}}

    def measure(run, device):
        name, path = run()
        if rank != 0:
            raise AssertionError("rank 1 measured")
        if name == "fails":
            raise RuntimeError("out of memory")
        return times[name][path]

    choice._measure = measure

    def problem(name, shared=True):
        return Problem(name, torch.device("cpu"),
                       lambda: {p: (lambda p=p: (name, p)) for p in PATHS}, shared)

    out = {}
    out["first"] = choice.decide(("first",), problem("first"))
    with choice.graph_mode():
        out["first_graph"] = choice.cached_path(("first",))
    out["no_grad"] = choice.decide(("no_grad",), problem("no_grad", shared=False))
    out["third"] = choice.decide(("third",), problem("third"))
    try:
        choice.decide(("fails",), problem("fails"))
    except RuntimeError as e:
        out["fails"] = str(e)
    choices = choice._report_choices()["choices"]
    out["sources"] = {name: choices[name]["source"] for name in choices}
    out["first_gpu_ms"] = choices["first"]["gpu_ms"]
    print(json.dumps(out))
    dist.destroy_process_group()
""")


def test_rank_0_decides_for_every_rank(tmp_path):
    """Two gloo ranks: rank 0 times and broadcasts, rank 1 never times; a call without
    gradients is not timed and makes no collective (the next decision still lines up); an
    error on rank 0 reaches rank 1 instead of leaving it waiting."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank),
                               str(tmp_path / "store")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a rank hung")
        assert proc.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    rank0, rank1 = outs
    for out in outs:
        assert (out["first"], out["first_graph"], out["no_grad"], out["third"]) == (
            "triton", "cudnn", "triton", "plain")
        assert out["first_gpu_ms"] == {"triton": 2.0, "cudnn": 1.0, "plain": 3.0}
    assert rank0["sources"] == {"first": "timed", "no_grad": "untimed", "third": "timed"}
    assert rank1["sources"] == {"first": "rank 0", "no_grad": "untimed", "third": "rank 0"}
    assert rank0["fails"] == "out of memory"
    assert rank1["fails"].startswith("rank 0 failed to decide conv2d_act's path for fails")


def test_environment_names_the_gpu_and_library_versions(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU {index}")
    choice.environment.cache_clear()
    try:
        assert choice.environment(1) == (
            f"GPU 1 | torch {torch.__version__} cudnn {torch.backends.cudnn.version()} "
            f"triton {triton.__version__}")
    finally:
        choice.environment.cache_clear()


# --------------------------------------------------------------------------------------------
# conv2d_act's side: the key, the problem's name and candidates, the routing
# --------------------------------------------------------------------------------------------

def _conv_inputs(dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 6, generator=g, dtype=dtype).requires_grad_(requires_grad)
    w = (torch.randn(6, 2, 3, 3, generator=g, dtype=dtype) / 4).requires_grad_(requires_grad)
    b = torch.randn(6, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return x, w, b


GEOM = conv_mod.ConvGeometry((1, 2), (1, 0), 2)
LRELU = reference.resolve_activation("lrelu", clamp=2.0)


def test_key_separates_what_changes_the_answer():
    x, w, b = _conv_inputs()

    def key(x=x, w=w, b=b, geom=GEOM, spec=LRELU, weight_gain=1.0):
        return conv_mod._choice_key(x, w, b, geom, spec, weight_gain)

    base = key()
    assert key() == base and hash(key()) == hash(base)
    with torch.no_grad():
        no_grad = key()
    with fastgan.no_weight_gradients():
        no_weights = key()
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = not allow_tf32
    try:
        tf32 = key()
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    variants = [
        key(x=x.contiguous(memory_format=torch.channels_last)), key(w=w.transpose(2, 3)),
        key(x=x.float(), w=w.float(), b=b.float()), key(x=x.detach()), key(b=None),
        key(geom=conv_mod.ConvGeometry((1, 1), (1, 0), 2)), key(spec=reference.resolve_activation(
            "relu", clamp=2.0)), key(spec=reference.resolve_activation("lrelu")),
        key(weight_gain=0.5), no_grad, no_weights, tf32]
    assert len({base, *variants}) == len(variants) + 1
    # alpha and the values of gain, clamp and weight gain cost the same
    assert key(spec=reference.resolve_activation("lrelu", alpha=0.1, gain=2.0, clamp=1.0),
               weight_gain=0.25) == key(weight_gain=0.5)


def test_problem_name_lists_the_key_and_the_environment(monkeypatch):
    monkeypatch.setattr(conv_mod, "environment", lambda index: f"<gpu {index} and versions>")
    x, w, b = _conv_inputs()
    with fastgan.no_weight_gradients():
        key = conv_mod._choice_key(x, w, None, GEOM, LRELU, 0.5)
    problem = conv_mod._problem(key, x, w, None, GEOM, LRELU, 0.5)
    tf32 = int(torch.backends.cudnn.allow_tf32)
    assert problem.name == (
        "x 2x4x5x6 strides 120x30x6x1 w 6x2x3x3 strides 18x9x3x1 stride 1x2 padding 1x0 "
        f"groups 2 float64 lrelu+gain+clamp+weight_gain grads x cudnn tf32={tf32} "
        "benchmark=0 deterministic=0 | <gpu -1 and versions>")
    assert problem.shared and problem.device == x.device
    with torch.no_grad():
        key = conv_mod._choice_key(x, w, b, GEOM, reference.resolve_activation(), 1.0)
    problem = conv_mod._problem(key, x, w, b, GEOM, reference.resolve_activation(), 1.0)
    assert " linear+bias grads none " in problem.name and not problem.shared


@pytest.mark.skipif(not interpreter_enabled(), reason="runs the fused candidates in the Triton "
                    "interpreter; tests/test_gpu_conv.py covers CUDA")
def test_candidates_compute_the_training_step(launches):
    """Each candidate runs its forward and the backward to x, weight and bias; all three give
    the reference's gradients (float64, 1e-10) and touch neither the inputs' .grad nor their
    graph."""
    x, w, b = _conv_inputs()
    y = reference.conv2d_act(x, w, b, GEOM.stride, GEOM.padding, GEOM.groups, "lrelu",
                             clamp=2.0, weight_gain=0.5)
    dy = conv_mod._empty_output(x, w, GEOM).normal_(generator=torch.Generator().manual_seed(0))
    expected = torch.autograd.grad(y, (x, w, b), dy)
    candidates = conv_mod._candidates(x, w, b, GEOM, LRELU, 0.5, (True, True, True))
    assert list(candidates) == list(PATHS)
    counts = {"triton": {"conv2d_act_fwd": 1, "bias_act_grad": 1},
              "cudnn": {"conv2d_act_cudnn": 1, "bias_act_fwd": 1, "bias_act_grad": 1},
              "plain": {}}
    for path, run in candidates.items():
        fastgan.reset_launch_counts()
        grads = run()
        assert launches() == counts[path], path
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert x.grad is None and w.grad is None and b.grad is None

    forward_only = conv_mod._candidates(x, w, b, GEOM, LRELU, 0.5, (False, False, False))
    for path, run in forward_only.items():
        out = run()
        assert not out.requires_grad
        torch.testing.assert_close(out, y.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("path, counts", [
    ("plain", {}), ("triton", {"conv2d_act_fwd": 1, "bias_act_grad": 1}),
    ("cudnn", {"conv2d_act_cudnn": 1, "bias_act_fwd": 1, "bias_act_grad": 1})])
@pytest.mark.skipif(not interpreter_enabled(), reason="the fused paths run in the Triton "
                    "interpreter here; tests/test_gpu_conv.py covers CUDA")
def test_conv2d_act_runs_the_chosen_path(path, counts, launches, monkeypatch):
    """conv2d_act asks for the path once per call, before Conv2dAct: 'plain' is the reference
    with autograd's backward (no fastgan kernel at all), the others the fused op."""
    asked = []

    def choose(x, weight, bias, geom, spec, weight_gain):
        asked.append((geom, spec, weight_gain))
        return path

    monkeypatch.setattr(conv_mod, "_choose_path", choose)
    x, w, b = _conv_inputs()
    kwargs = dict(stride=(1, 2), padding=(1, 0), groups=2, act="lrelu", clamp=2.0,
                  weight_gain=0.5)
    y = fastgan.conv2d_act(x, w, b, **kwargs)
    grads = torch.autograd.grad(y.square().sum(), (x, w, b))
    assert launches() == counts
    assert asked == [(GEOM, LRELU, 0.5)]
    expected_y = reference.conv2d_act(x, w, b, **kwargs)
    expected = torch.autograd.grad(expected_y.square().sum(), (x, w, b))
    torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-10)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.skipif(not interpreter_enabled(), reason="the fused paths run in the Triton "
                    "interpreter here; tests/test_gpu_conv.py covers CUDA")
def test_forced_plain_runs_the_reference_and_cpu_auto_runs_triton(launches, monkeypatch):
    x, w, b = _conv_inputs(requires_grad=False)
    monkeypatch.setenv("FASTGAN_CONV", "plain")
    fastgan.conv2d_act(x, w, b, groups=2, act="lrelu")
    assert launches() == {}
    monkeypatch.delenv("FASTGAN_CONV")
    fastgan.conv2d_act(x, w, b, groups=2, act="lrelu")
    assert launches() == {"conv2d_act_fwd": 1}
    assert _entries() == {}  # nothing decided for CPU tensors
