"""fastgan.ops.launch: the direct-launch cache, checked with stand-in kernels on the CPU.

The compiled path itself needs a GPU (tests/test_gpu_ops.py::test_direct_launch_*); here the
launcher's bookkeeping is checked exactly: which launches go through Triton's JIT, which call
the compiled kernel directly, with which arguments, in which order.
"""
import contextlib
import inspect
import types

import pytest
import torch

import fastgan
from fastgan.ops import conv2d_act as conv_mod
from fastgan.ops import launch
from fastgan.ops.launch import KernelLauncher


class FakeCompiled:
    """Stands in for a triton CompiledKernel: records ``run`` calls, made with the launcher's
    parameters (those of triton's CudaLauncher)."""
    function = "function-handle"
    packed_metadata = "packed-metadata"

    def __init__(self):
        self.runs = []

    def run(self, grid_x, grid_y, grid_z, stream, function, kernel_metadata, launch_metadata,
            launch_enter_hook, launch_exit_hook, *args):
        self.runs.append((grid_x, grid_y, grid_z, stream, function, kernel_metadata,
                          launch_metadata, launch_enter_hook, launch_exit_hook, *args))


@pytest.fixture(autouse=True)
def _direct_launches_allowed(monkeypatch):
    """Each test starts with direct launches allowed (the process-wide fallback unset)."""
    monkeypatch.setattr(launch, "_jit_only_reason", None)


class FakeJIT:
    """Stands in for a @triton.jit function: ``kernel[grid](*args, **meta)`` is recorded and
    returns one FakeCompiled per call."""

    def __init__(self, arg_names):
        self.arg_names = arg_names
        self.jit_calls, self.compiled = [], []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.jit_calls.append((grid, args, meta))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]
        return run


@pytest.fixture
def compiled_mode(monkeypatch):
    """Launchers behave as on a GPU (no interpreter)."""
    def make(kernel, name="fake"):
        launcher = KernelLauncher(kernel, name)
        launcher._interpreted = False
        return launcher
    return make


NAMES = ["a_ptr", "b_ptr", "n", "stride", "BLOCK", "FLAG"]


def test_first_launch_through_the_jit_then_direct(compiled_mode, launches):
    kernel = FakeJIT(NAMES)
    launcher = compiled_mode(kernel)
    a, b = torch.zeros(64), torch.zeros(64)
    launcher((4,), (a, b), (64, 1), dict(FLAG=True, BLOCK=16, num_warps=4))
    assert len(kernel.jit_calls) == 1
    assert kernel.jit_calls[0] == ((4,), (a, b, 64, 1), dict(FLAG=True, BLOCK=16, num_warps=4))
    a2, b2 = torch.zeros(64), torch.zeros(64)
    launcher((4,), (a2, b2), (64, 1), dict(FLAG=True, BLOCK=16, num_warps=4))
    assert len(kernel.jit_calls) == 1
    runs = kernel.compiled[0].runs
    assert len(runs) == 1
    gx, gy, gz, stream, function, packed, metadata, enter, leave, *args = runs[0]
    assert (gx, gy, gz, stream) == (4, 1, 1, 0)
    assert (function, packed, metadata, enter, leave) == (
        "function-handle", "packed-metadata", None, None, None)
    assert args[0] is a2 and args[1] is b2
    assert args[2:] == [64, 1, 16, True]  # ints, then constexprs in signature order
    assert launches() == {"fake": 2}


def test_a_new_problem_goes_through_the_jit(compiled_mode):
    """Other integer values, dtypes, 16-byte alignment or constexprs: a new problem."""
    kernel = FakeJIT(NAMES)
    launcher = compiled_mode(kernel)
    a = torch.zeros(64)
    meta = dict(BLOCK=16, FLAG=True)
    launcher((4,), (a, a), (64, 1), meta)
    launcher((4,), (a, a), (63, 1), meta)                     # an integer value
    launcher((4,), (a.double(), a), (64, 1), meta)           # a dtype
    launcher((4,), (a[1:], a), (64, 1), meta)                # 4-byte offset: not 16-aligned
    launcher((4,), (a, a), (64, 1), dict(BLOCK=32, FLAG=True))  # a constexpr
    assert len(kernel.jit_calls) == 5
    launcher((4,), (a[4:], a), (64, 1), meta)                # 16-byte offset: aligned
    assert len(kernel.jit_calls) == 5
    assert [len(c.runs) for c in kernel.compiled] == [1, 0, 0, 0, 0]


def test_autotuned_kernel_keeps_the_chosen_config_and_grid(compiled_mode, monkeypatch):
    """For an autotuned kernel the grid is computed once from the config the autotuner chose,
    and the config's block sizes are passed as constexprs to the compiled kernel."""
    tuner = conv_mod._conv2d_act_fwd_kernel
    compiled = FakeCompiled()
    calls = []

    def fake_run(*args, grid, warmup, **kwargs):
        calls.append(grid)
        return compiled

    config = tuner.configs[0]
    monkeypatch.setattr(tuner, "run", fake_run)
    monkeypatch.setattr(tuner, "best_config", config, raising=False)
    launcher = compiled_mode(tuner, "conv")
    names = tuner.fn.arg_names
    n_pointers, n_ints = 5, names.index("KH") - 5
    pointers = tuple(torch.zeros(8) for _ in range(n_pointers))
    ints = tuple(range(2, 2 + n_ints))
    meta = dict(KH=3, KW=3, HAS_BIAS=True, ACT=2, USE_CLAMP=False, INPUT_PRECISION="ieee",
                INT64=False)
    grids = []

    def grid(full_meta):
        grids.append(dict(full_meta))
        return (full_meta["BLOCK_M"] + full_meta["BLOCK_N"],)

    for _ in range(3):
        launcher(grid, pointers, ints, meta)
    assert len(calls) == 1 and len(grids) == 1
    assert grids[0] == {**meta, **config.kwargs}
    assert len(compiled.runs) == 2
    gx, gy, gz, *_ = compiled.runs[0]
    assert (gx, gy, gz) == (config.kwargs["BLOCK_M"] + config.kwargs["BLOCK_N"], 1, 1)
    tail = compiled.runs[0][9 + n_pointers + n_ints:]
    assert tail == tuple({**meta, **config.kwargs}[n] for n in names[n_pointers + n_ints:])


def test_the_installed_triton_takes_the_argument_list_fastgan_builds():
    """Tied to Triton's own code: the call its JITFunction.run makes, and the parameters of
    its CUDA launcher class (checked without a GPU on the class itself)."""
    assert launch.direct_launch_problem() is None
    from triton.backends.nvidia.driver import CudaLauncher
    real = types.SimpleNamespace(run=types.MethodType(CudaLauncher.__call__, object()))
    assert launch.launcher_problem(real) is None
    assert launch.launcher_problem(FakeCompiled()) is None


def test_a_launcher_with_other_parameters_is_refused():
    def run(grid_x, grid_y, grid_z, stream, function, *args):
        pass

    problem = launch.launcher_problem(types.SimpleNamespace(run=run))
    assert problem.startswith("triton ") and "not 9 arguments then the kernel's" in problem


def test_a_jit_calling_kernel_run_otherwise_is_refused(monkeypatch):
    """A triton whose JITFunction.run passes kernel.run other arguments (older tritons passed
    the arguments without constexprs) is detected from its source."""
    real_getsource = inspect.getsource
    other = (
        "def run(self, *args, grid, warmup, **kwargs):\n"
        "    kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,"
        " launch_metadata, enter, leave, *non_constexpr_vals)\n")
    monkeypatch.setattr(inspect, "getsource", lambda obj: other if obj.__name__ == "run"
                        else real_getsource(obj))
    launch.direct_launch_problem.cache_clear()
    try:
        problem = launch.direct_launch_problem()
    finally:
        launch.direct_launch_problem.cache_clear()
    assert problem.endswith("calls kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, "
                            "kernel.packed_metadata, launch_metadata, enter, leave, "
                            "*non_constexpr_vals), not the argument list fastgan builds")


def test_a_refused_launcher_sends_every_launch_through_the_jit_with_one_warning(
        compiled_mode, monkeypatch):
    monkeypatch.setattr(launch, "direct_launch_problem", lambda: "demo: other arguments")
    kernel = FakeJIT(NAMES)
    launcher = compiled_mode(kernel)
    a = torch.zeros(64)
    with pytest.warns(RuntimeWarning, match="launch through the JIT from now on .*demo: other "
                                            "arguments") as caught:
        for _ in range(3):
            launcher((4,), (a, a), (64, 1), dict(FLAG=True, BLOCK=16))
    assert len(caught) == 1
    assert len(kernel.jit_calls) == 3 and kernel.compiled[0].runs == []
    assert launch.jit_only_reason() == "demo: other arguments"


def test_a_direct_launch_that_raises_is_redone_through_the_jit(compiled_mode):
    kernel = FakeJIT(NAMES)
    launcher = compiled_mode(kernel)
    a = torch.zeros(64)
    launcher((4,), (a, a), (64, 1), dict(FLAG=True, BLOCK=16))

    def broken(*args):
        raise TypeError("function takes exactly 12 arguments (15 given)")

    kernel.compiled[0].run = broken
    with pytest.warns(RuntimeWarning, match="a direct launch of fake raised TypeError"):
        launcher((4,), (a, a), (64, 1), dict(FLAG=True, BLOCK=16))
    assert len(kernel.jit_calls) == 2  # the failed launch, redone
    launcher((4,), (a, a), (64, 1), dict(FLAG=True, BLOCK=16))
    assert len(kernel.jit_calls) == 3


class _FakeCudaPointer:
    """A pointer argument on ``cuda:index`` (CPU tests have no CUDA tensors)."""
    dtype = torch.float32

    def __init__(self, index):
        self.device = torch.device("cuda", index)

    def data_ptr(self):
        return 0


def test_launches_run_under_a_device_guard_for_another_device(compiled_mode, monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: the launch runs inside
    torch.cuda.device(1); tensors on the current device need no guard."""
    guarded = []

    @contextlib.contextmanager
    def device(index):
        guarded.append(index)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    kernel = FakeJIT(NAMES)
    launcher = compiled_mode(kernel)
    seen = []
    monkeypatch.setattr(launcher, "_launch", lambda device, *args: seen.append(device))
    launcher((4,), (_FakeCudaPointer(1),) * 2, (64, 1), dict(FLAG=True, BLOCK=16))
    launcher((4,), (_FakeCudaPointer(0),) * 2, (64, 1), dict(FLAG=True, BLOCK=16))
    assert guarded == [1] and seen == [1, 0]


def test_recording_replaces_launches(compiled_mode, launches):
    kernel = FakeJIT(NAMES)
    launcher = compiled_mode(kernel, "recorded")
    a = torch.zeros(4)
    with launch.recording() as recorded:
        launcher((1,), (a, a), (4, 1), dict(BLOCK=16, FLAG=False))
        assert launch.is_recording()
    assert not launch.is_recording()
    assert kernel.jit_calls == []
    (r,) = recorded
    assert (r.name, r.kernel, r.pointers, r.ints, r.meta, r.grid) == (
        "recorded", kernel, (a, a), (4, 1), dict(BLOCK=16, FLAG=False), (1,))
    assert launches() == {"recorded": 1}


def test_interpreter_launches_every_time_through_the_kernel():
    """In the interpreter there is no compiled kernel to keep: each call is kernel[grid]."""
    kernel = FakeJIT(NAMES)
    launcher = KernelLauncher(kernel, "interpreted")
    assert launcher._interpreted == fastgan.backend.interpreter_enabled()
    launcher._interpreted = True
    a = torch.zeros(4)
    for _ in range(2):
        launcher((1,), (a, a), (4, 1), dict(BLOCK=16, FLAG=False))
    assert len(kernel.jit_calls) == 2 and launcher._cache == {}


def test_recording_runs_the_launchers_on_meta_tensors():
    """Under recording() meta tensors take the Triton path (for the compile check and the
    host-overhead benchmark); outside it they run the reference."""
    x = torch.empty(2, 4, 6, 6, device="meta", requires_grad=True)
    w = torch.empty(4, 4, 3, 3, device="meta", requires_grad=True)
    with launch.recording() as recorded:
        y = fastgan.conv2d_act(x, w, None, 1, 1, act="lrelu")
        torch.autograd.grad(y, (x, w), torch.empty_like(y))
    assert [r.name for r in recorded] == ["conv2d_act_fwd", "bias_act_grad"]
    assert not fastgan.backend.use_triton(x)
