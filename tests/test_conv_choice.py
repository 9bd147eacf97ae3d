"""The per-problem choice of conv2d_act's implementation (fastgan.ops.conv_choice), on CPU:
stand-in timings, the cache file, two gloo ranks, capture, deterministic mode, failing
candidates, and conv2d_act's routing."""
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import triton

import fastgan
from fastgan import reference
from fastgan.backend import interpreter_enabled
from fastgan.ops import conv2d_act as conv_mod
from fastgan.ops import conv_choice as choice
from fastgan.ops.conv_choice import PATHS, Problem

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.delenv("FASTGAN_CONV", raising=False)
    monkeypatch.delenv("FASTGAN_CONV_CACHE", raising=False)
    monkeypatch.setattr(choice, "_warned", set())
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


def _problem(name="p"):
    """A problem whose candidates return their own path name."""
    return Problem(name, torch.device("cpu"),
                   lambda: {path: (lambda path=path: path) for path in PATHS})


SOURCES = choice.kernel_sources_hash()


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
        "eager": "cudnn", "graph": "triton", "source": "timed", "sources": SOURCES,
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
             "host_ms": {"triton": 0.1, "cudnn": 0.1, "plain": 0.1}, "eager": "triton",
             "sources": SOURCES}
    path.write_text(json.dumps({
        "known": known,
        "no plain": {"gpu_ms": {"triton": 2.0, "cudnn": 3.0},
                     "host_ms": {"triton": 2.0, "cudnn": 3.0}, "sources": SOURCES},
        "old kernels": dict(known, sources="0123456789ab"),
        "no sources": {k: v for k, v in known.items() if k != "sources"},
        "not a number": dict(known, gpu_ms=dict(known["gpu_ms"], plain="fast")),
        "negative": dict(known, host_ms=dict(known["host_ms"], cudnn=-1.0)),
        "path only": {"path": "cudnn", "sources": SOURCES}}))
    monkeypatch.setenv("FASTGAN_CONV_CACHE", str(path))
    measured = _stand_in_timings(monkeypatch, {"triton": (1.0, 1.0), "cudnn": (3.0, 3.0),
                                               "plain": (2.0, 2.0)})
    # The answers come from the measurements, not from a stored "eager"; a path that failed
    # when it was timed is not in the entry and not chosen.
    assert choice.decide(("known",), _problem("known")) == "cudnn"
    assert choice.decide(("no plain",), _problem("no plain")) == "triton"
    assert measured == []
    renewed = ["old kernels", "no sources", "not a number", "negative", "path only", "new"]
    for i, name in enumerate(renewed):
        assert choice.decide((name,), _problem(name)) == "triton"
        assert len(measured) == 3 * (i + 1)  # invalid or stale entries are timed again
    saved = json.loads(path.read_text())
    assert saved["known"] == known
    new = {"eager": "triton", "graph": "triton", "sources": SOURCES,
           "gpu_ms": {"triton": 1.0, "cudnn": 3.0, "plain": 2.0},
           "host_ms": {"triton": 1.0, "cudnn": 3.0, "plain": 2.0}}
    assert saved["new"] == saved["old kernels"] == new
    assert _entries()["known"]["source"] == "file" and _entries()["new"]["source"] == "timed"

    choice.clear_choices()  # a new process: memory empty, the file read again
    assert choice.decide(("new",), _problem("new")) == "triton"
    assert len(measured) == 18 and _entries()["new"]["source"] == "file"
    assert fastgan.backend_info()["conv2d_act_choices"]["cache_file"] == str(path)


def test_kernel_sources_hash_covers_the_op_sources():
    ops_dir = Path(choice.__file__).parent
    assert len(SOURCES) == 12 and int(SOURCES, 16) >= 0
    assert {"conv2d_act.py", "bias_act.py", "activation.py", "launch.py"} <= {
        p.name for p in ops_dir.glob("*.py")}


def test_cache_file_merges_atomically(tmp_path):
    path = tmp_path / "sub" / "choices.json"
    choice.write_cache_file(str(path), "a", {"eager": "triton"})
    choice.write_cache_file(str(path), "b", {"eager": "cudnn"})
    assert choice.read_cache_file(str(path)) == {"a": {"eager": "triton"},
                                                      "b": {"eager": "cudnn"}}
    # no temporary file left; the lock file stays (it is what writers lock)
    assert sorted(p.name for p in path.parent.iterdir()) == ["choices.json", "choices.json.lock"]
    path.write_text("{not json")
    assert choice.read_cache_file(str(path)) == {}


# Writer WHO adds N entries to FILE, one write each, as a process deciding new problems does.
WRITER_SCRIPT = textwrap.dedent("""
    import sys
    from fastgan.ops import conv_choice
    who, n, file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    for i in range(n):
        conv_choice.write_cache_file(file, f"{who} {i}", {"eager": "cudnn", "i": i})
""")


def test_concurrent_writers_lose_no_entry_and_never_tear_the_file(tmp_path):
    """Two processes write 40 entries each into one file while this one keeps reading it:
    every read is complete JSON, and the file ends with all 80 entries."""
    path = tmp_path / "choices.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, who, "40", str(path)],
                                env=env, stderr=subprocess.PIPE, text=True) for who in "ab"]
    reads = 0
    while any(w.poll() is None for w in writers):
        if path.exists():
            json.loads(path.read_text())  # raises on a torn file
            reads += 1
    for w in writers:
        assert w.wait() == 0, w.stderr.read()[-2000:]
    saved = json.loads(path.read_text())
    assert set(saved) == {f"{who} {i}" for who in "ab" for i in range(40)}
    assert reads > 0


def test_an_unwritable_cache_file_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("FASTGAN_CONV_CACHE", str(blocker / "choices.json"))  # under a file
    _stand_in_timings(monkeypatch, {"triton": (2.0, 2.0), "cudnn": (1.0, 1.0),
                                    "plain": (3.0, 3.0)})
    with pytest.warns(RuntimeWarning, match=r"FASTGAN_CONV_CACHE=.*choices.json cannot be "
                                            r"written .*kept in memory") as caught:
        assert choice.decide(("a",), _problem("a")) == "cudnn"
        assert choice.decide(("b",), _problem("b")) == "cudnn"
    assert len([w for w in caught if "cannot be written" in str(w.message)]) == 1
    assert _entries()["b"]["source"] == "timed"


def test_a_failing_candidate_is_dropped_with_one_warning(monkeypatch):
    """A candidate that raises while timed (out of memory in plain, say) is not chosen and
    not fatal; the warning comes once per path, not once per problem."""
    def measure(run, device):
        path = run()
        if path == "plain":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return {"triton": (2.0, 2.0), "cudnn": (3.0, 3.0)}[path]

    monkeypatch.setattr(choice, "_measure", measure)
    with pytest.warns(RuntimeWarning, match="conv2d_act's plain path failed while it was timed "
                                            "for a and is not used there: OutOfMemoryError"):
        assert choice.decide(("a",), _problem("a")) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choice.decide(("b",), _problem("b")) == "triton"
    entry = _entries()["a"]
    assert set(entry["gpu_ms"]) == {"triton", "cudnn"}
    assert entry["failed"]["plain"].startswith("OutOfMemoryError: CUDA out of memory")


def test_every_candidate_failing_leaves_the_fixed_path_untimed(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTGAN_CONV_CACHE", str(tmp_path / "choices.json"))

    def measure(run, device):
        raise RuntimeError(f"{run()} broke")

    monkeypatch.setattr(choice, "_measure", measure)
    with pytest.warns(RuntimeWarning):
        assert choice.decide(("a",), _problem("a")) == choice.FIXED_PATH == "cudnn"
    entry = _entries()["a"]
    assert entry["source"] == "untimed" and "every candidate failed" in entry["reason"]
    assert entry["failed"] == {p: f"RuntimeError: {p} broke" for p in PATHS}
    assert not (tmp_path / "choices.json").exists()  # a failure is not kept for later runs


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
            assert choice.decide(("k",), _problem()) == "cudnn"
    assert choice.cached_path(("k",)) == "cudnn"  # kept for the process
    assert measured == []
    entry = _entries()["p"]
    assert entry["source"] == "untimed" and "CUDA graph capture" in entry["reason"]
    assert (entry["eager"], entry["graph"]) == ("cudnn", "cudnn")
    assert fastgan.backend_info()["conv2d_act_choices"]["fixed_path"] == "cudnn"


# Rank RANK of 2 (gloo, file store STORE), each timing stand-ins with its own numbers: rank 0
# meets problems "shared" and "rank 0 only" (a diagnostic only it runs), rank 1 "shared" and
# "rank 1 only". Then both meet a barrier: a collective inside a decision would have paired
# with it or hung. Prints one JSON line: each decision and the sources.
RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from fastgan.ops import conv_choice as choice
    from fastgan.ops.conv_choice import PATHS, Problem

    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    fast = ("triton", "plain")[rank]  # the ranks measure different winners

    def measure(run, device):
        name, path = run()
        return (1.0, 1.0) if path == fast else (2.0, 2.0)

    choice._measure = measure

    def problem(name):
        return Problem(name, torch.device("cpu"),
                       lambda: {p: (lambda p=p: (name, p)) for p in PATHS})

    alone = f"rank {rank} only"
    out = {name: choice.decide((name,), problem(name)) for name in ("shared", alone)}
    dist.barrier()
    choices = choice._report()["choices"]
    out["sources"] = {name: choices[name]["source"] for name in choices}
    print(json.dumps(out))
    dist.destroy_process_group()
""")


def test_each_rank_decides_alone_without_collectives(tmp_path):
    """Two gloo ranks meet different problems, one of them a call only that rank makes: both
    finish, each with its own measurements and no answer taken from the other."""
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
    assert outs[0] == {"shared": "triton", "rank 0 only": "triton",
                       "sources": {"shared": "timed", "rank 0 only": "timed"}}
    assert outs[1] == {"shared": "plain", "rank 1 only": "plain",
                       "sources": {"shared": "timed", "rank 1 only": "timed"}}


def test_no_collective_in_the_ops_or_the_backend_rule():
    """The choice is local to the process: nothing below the trainer talks to other ranks."""
    package = REPO / "fastgan"
    for path in [package / "backend.py", package / "ext.py", *(package / "ops").glob("*.py")]:
        text = path.read_text()
        assert "torch.distributed" not in text and "import dist" not in text, path


def test_deterministic_algorithms_time_nothing_and_run_the_fixed_path(deterministic,
                                                                      monkeypatch):
    """Under torch.use_deterministic_algorithms(True) conv2d_act on CUDA takes cudnn without
    asking the choice (checked on the routing with a stand-in CUDA tensor check)."""
    measured = _stand_in_timings(monkeypatch, {path: (1.0, 1.0) for path in PATHS})
    x, w, b = _conv_inputs()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert conv_mod._choose_path(x, w, b, GEOM, LRELU, 1.0) == "cudnn"
    assert measured == [] and _entries() == {}
    assert "off (torch.use_deterministic_algorithms)" in choice._report()["timing"]
    monkeypatch.setenv("FASTGAN_CONV", "plain")  # a forced path still wins
    assert conv_mod._choose_path(x, w, b, GEOM, LRELU, 1.0) == "plain"


@pytest.mark.skipif(not interpreter_enabled(), reason="runs the Triton conv in the interpreter")
def test_deterministic_algorithms_launch_the_triton_conv_with_a_fixed_config(deterministic,
                                                                           monkeypatch):
    """A forced triton conv under deterministic algorithms launches the kernel itself with
    the first config that fits, not through the autotuner."""
    from fastgan.ops import launch

    monkeypatch.setenv("FASTGAN_CONV", "triton")
    x, w, b = _conv_inputs(requires_grad=False)
    with launch.recording() as launches_seen:
        fastgan.conv2d_act(x.to("meta"), w.to("meta"), b.to("meta"), groups=2, act="lrelu")
    (seen,) = launches_seen
    assert seen.kernel is conv_mod._conv2d_act_fwd_kernel.fn
    expected = conv_mod._fixed_config(2, 3)
    assert {k: seen.meta[k] for k in expected} == expected
    assert isinstance(seen.grid, tuple)
    torch.use_deterministic_algorithms(False)
    with launch.recording() as launches_seen:
        fastgan.conv2d_act(x.to("meta"), w.to("meta"), b.to("meta"), groups=2, act="lrelu")
    assert launches_seen[0].kernel is conv_mod._conv2d_act_fwd_kernel  # the autotuner


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
    assert problem.device == x.device
    with torch.no_grad():
        key = conv_mod._choice_key(x, w, b, GEOM, reference.resolve_activation(), 1.0)
    problem = conv_mod._problem(key, x, w, b, GEOM, reference.resolve_activation(), 1.0)
    assert " linear+bias grads none " in problem.name


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
