"""Which implementation runs (fastgan.backend): FASTGAN_BACKEND, set_backend(), the automatic
rule, backend_info(), and the launch counters that prove which one ran."""
import warnings

import pytest
import torch

import fastgan
from fastgan import backend, ext, reference
from op_helpers import DEVICE, assert_matches, leaf, randn
from test_ext import require_ext

EXPECTED_INFO_KEYS = {"backend", "backend_source", "torch", "triton", "triton_interpreter",
                      "extension", "cuda_available", "cuda_device", "cuda_tensors",
                      "cuda_extension", "cpu_tensors", "cpu_extension", "triton_error"}
TRITON_OPS = {"bias_act_fwd": 1, "bias_act_grad": 1, "per_sample_dot": 1, "scale_per_sample": 1}
EXT_OPS = {"ext_bias_act": 1, "ext_bias_act_grad": 1, "ext_per_sample_dot": 1,
           "ext_scale_per_sample": 1}
NOT_BUILT = "not built; build it with `python -m fastgan build-ext`"
interpreted = pytest.mark.skipif(not backend.interpreter_enabled(),
                                 reason="needs the Triton interpreter on CPU (no GPU)")

# What backend_info says runs for CUDA tensors when the Triton kernels do.
CUDA_TRITON = ("Triton kernels, compiled" if torch.cuda.is_available()
               else "Triton kernels, compiled (would run; no CUDA device here)")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("FASTGAN_BACKEND", raising=False)


@pytest.fixture
def interpreter_off(monkeypatch):
    """CPU tensors as on a machine where TRITON_INTERPRET was not set."""
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)


@pytest.fixture
def ext_usable():
    require_ext()


@pytest.fixture
def ext_unusable(monkeypatch):
    """The extension as where it was never built; the 'cannot run' warning not yet given."""
    monkeypatch.setattr(ext, "_state", ext._State(None, NOT_BUILT, NOT_BUILT))
    monkeypatch.setattr(backend, "_ext_warned", set())


def _run_ops(device=DEVICE, ops=fastgan):
    """bias_act and grad_sq_norm of ``ops`` (fastgan, or fastgan.reference) forward +
    backward; returns the outputs and gradients."""
    x, b = leaf(randn(2, 3, 4, seed=70, device=device)), leaf(randn(3, seed=71, device=device))
    y = ops.bias_act(x, b, 1, "lrelu", clamp=1.0)
    n = ops.grad_sq_norm(y)
    dx, db = torch.autograd.grad(n.sum(), (x, b))
    return y.detach(), n.detach(), dx, db


def test_default_is_auto(no_env):
    assert backend.get_backend() == ("auto", "default")
    info = fastgan.backend_info()
    assert info["backend"] == "auto" and info["backend_source"] == "default"


def test_auto_runs_kernels_for_kernel_device(no_env, launches):
    """By default, tensors on DEVICE (CUDA, or CPU with the interpreter) run the Triton
    kernels, whether or not the extension is usable."""
    _run_ops()
    assert launches() == TRITON_OPS


def test_auto_runs_extension_for_cpu_without_interpreter(no_env, interpreter_off, ext_usable,
                                                         launches):
    """CPU tensors without TRITON_INTERPRET run the extension when it is usable."""
    got = _run_ops(device="cpu")
    assert launches() == EXT_OPS
    for a, b in zip(got, _run_ops(device="cpu", ops=reference)):
        assert_matches(a, b)
    info = fastgan.backend_info()
    assert info["cpu_tensors"] == "compiled extension (torch.ops.fastgan)"
    assert info["cpu_extension"] == "in use"


def test_auto_runs_reference_for_cpu_without_interpreter_or_extension(
        no_env, interpreter_off, ext_unusable, launches):
    """CPU tensors without TRITON_INTERPRET or the extension run the reference: same
    numbers, no launch; backend_info says why the extension is not used."""
    got = _run_ops(device="cpu")
    assert launches() == {}
    for a, b in zip(got, _run_ops(device="cpu", ops=reference)):
        assert torch.equal(a, b)
    info = fastgan.backend_info()
    assert info["cpu_tensors"].startswith("torch reference")
    assert info["cpu_extension"] == f"not used: {NOT_BUILT}"
    assert info["extension"] is None


def test_auto_without_triton_runs_extension_else_reference(no_env, monkeypatch, launches):
    """No triton package: auto runs the extension where usable, else the reference; forced
    'triton' explains why it cannot run."""
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    require_ext()
    _run_ops(device="cpu")
    assert launches() == EXT_OPS
    fastgan.reset_launch_counts()
    monkeypatch.setattr(ext, "_state", ext._State(None, NOT_BUILT, NOT_BUILT))
    _run_ops()
    assert launches() == {}
    fastgan.set_backend("triton")
    with pytest.raises(RuntimeError, match="backend 'triton' .*needs the triton package"):
        fastgan.bias_act(randn(2, 3), None, 1)


@pytest.mark.parametrize("value", ["torch", " Torch ", "TORCH"])
def test_env_torch_runs_reference_and_launches_nothing(value, monkeypatch, launches):
    """FASTGAN_BACKEND=torch (any case, spaces ignored): the reference runs, no kernel does."""
    monkeypatch.setenv("FASTGAN_BACKEND", value)
    assert backend.get_backend() == ("torch", "FASTGAN_BACKEND")
    got = _run_ops()
    assert launches() == {}
    for a, b in zip(got, _run_ops(ops=reference)):
        assert torch.equal(a, b)
    info = fastgan.backend_info()
    assert info["backend"] == "torch" and info["backend_source"] == "FASTGAN_BACKEND"
    assert "torch reference" in info["cpu_tensors"] and "torch reference" in info["cuda_tensors"]


def test_env_triton_runs_kernels(monkeypatch, launches):
    monkeypatch.setenv("FASTGAN_BACKEND", "triton")
    assert backend.get_backend() == ("triton", "FASTGAN_BACKEND")
    _run_ops()
    assert launches() == TRITON_OPS


@pytest.mark.parametrize("value", ["ext", " EXT "])
def test_env_ext_runs_extension(value, monkeypatch, ext_usable, launches):
    """FASTGAN_BACKEND=ext runs the extension, also where auto would run Triton."""
    monkeypatch.setenv("FASTGAN_BACKEND", value)
    assert backend.get_backend() == ("ext", "FASTGAN_BACKEND")
    _run_ops(device="cpu")
    assert launches() == EXT_OPS
    assert fastgan.backend_info()["cpu_extension"] == "in use"


@pytest.mark.parametrize("interpreter", [pytest.param(True, marks=interpreted), False])
def test_forced_ext_unusable_warns_once_and_runs_the_next(interpreter, ext_unusable,
                                                          monkeypatch, launches):
    """Forced 'ext' where the extension cannot run: what auto would run without it runs
    (Triton in the interpreter, else the reference), and a warning says why, once."""
    if not interpreter:
        monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)
    fastgan.set_backend("ext")
    fallback = "the Triton kernels" if interpreter else "the torch reference"
    message = (f"fastgan: backend 'ext' (from set_backend()) cannot run cpu tensors: "
               f"{NOT_BUILT}; running {fallback} instead")
    with pytest.warns(RuntimeWarning) as record:
        got = _run_ops(device="cpu")
    assert [str(w.message) for w in record] == [message]
    assert launches() == (TRITON_OPS if interpreter else {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _run_ops(device="cpu")
    for a, b in zip(got, again):
        assert torch.equal(a, b)
    info = fastgan.backend_info()
    assert info["cpu_extension"] == f"not used: {NOT_BUILT}"
    assert info["cpu_tensors"].startswith("Triton kernels" if interpreter else "torch reference")


def test_rule_while_torch_compile_traces(monkeypatch):
    """While torch.compile traces, auto takes the extension (traceable), else the reference;
    never the Triton launchers, unless forced."""
    usable = ext._State("lib.so", None, None)
    monkeypatch.setattr(ext, "_state", usable)
    for device_type in ("cpu", "cuda"):
        assert backend._choose(device_type, compiling=True, warn=False) == "ext"
    monkeypatch.setattr(ext, "_state", ext._State(None, NOT_BUILT, NOT_BUILT))
    for device_type in ("cpu", "cuda"):
        assert backend._choose(device_type, compiling=True, warn=False) == "torch"
    fastgan.set_backend("triton")
    assert backend._choose("cuda", compiling=True, warn=False) == "triton"


def test_rule_for_cuda_tensors(no_env, monkeypatch):
    """CUDA tensors under auto run Triton even where the extension has CUDA kernels (they sum
    in another order; nothing is timed); the extension runs when forced, and while tracing."""
    monkeypatch.setattr(ext, "_state", ext._State("lib.so", None, None))
    assert backend._choose("cuda", compiling=False, warn=False) == "triton"
    assert backend._choose("cuda", compiling=True, warn=False) == "ext"
    for forced in ("triton", "ext", "torch"):
        fastgan.set_backend(forced)
        assert backend._choose("cuda", compiling=False, warn=False) == forced
    fastgan.set_backend(None)
    monkeypatch.setattr(ext, "_state", ext._State("lib.so", None, "no CUDA kernels (demo)"))
    assert backend._choose("cuda", compiling=False, warn=False) == "triton"


def test_env_auto(monkeypatch, launches):
    monkeypatch.setenv("FASTGAN_BACKEND", "auto")
    assert backend.get_backend() == ("auto", "FASTGAN_BACKEND")
    _run_ops()
    assert launches().get("per_sample_dot", 0) > 0


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTGAN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTGAN_BACKEND must be one of .*'cuda'"):
        fastgan.bias_act(randn(2, 3), None, 1)
    with pytest.raises(ValueError, match="FASTGAN_BACKEND"):
        fastgan.backend_info()


def test_set_backend_overrides_env_and_none_restores_it(monkeypatch, launches):
    """set_backend() wins over FASTGAN_BACKEND; set_backend(None) goes back to the env."""
    monkeypatch.setenv("FASTGAN_BACKEND", "triton")
    fastgan.set_backend("torch")
    assert backend.get_backend() == ("torch", "set_backend()")
    _run_ops()
    assert launches() == {}
    fastgan.set_backend(None)
    assert backend.get_backend() == ("triton", "FASTGAN_BACKEND")
    _run_ops()
    assert launches().get("bias_act_fwd", 0) > 0
    fastgan.set_backend("auto")
    assert backend.get_backend() == ("auto", "set_backend()")


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"set_backend\(name\) must be one of .*'gpu'"):
        fastgan.set_backend("gpu")
    assert backend.get_backend()[0] in backend.BACKENDS  # the bad call changed nothing


@pytest.mark.parametrize("op", ["bias_act", "grad_sq_norm"])
def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(op, no_env, interpreter_off,
                                                                   launches):
    """A CPU tensor cannot run compiled kernels: the error says so and names the fix."""
    fastgan.set_backend("triton")
    x = randn(2, 3, device="cpu")
    with pytest.raises(RuntimeError, match=r"backend 'triton' \(from set_backend\(\)\) cannot run "
                                           r"a cpu tensor.*TRITON_INTERPRET=1"):
        fastgan.bias_act(x, None, 1) if op == "bias_act" else fastgan.grad_sq_norm(x)
    assert launches() == {}
    assert fastgan.backend_info()["cpu_tensors"].startswith("error")


# Imports fastgan where triton cannot be imported (HOW: 'missing', a None entry in
# sys.modules; 'broken', a triton package that raises), runs bias_act and grad_sq_norm on CPU
# tensors and prints what ran and backend_info's lines.
NO_TRITON_SCRIPT = """
import json, sys
how = sys.argv[1]
if how == "missing":
    sys.modules["triton"] = None
else:
    sys.path.insert(0, sys.argv[2])
import torch, fastgan
from fastgan import reference
x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
y = fastgan.bias_act(x, None, 1, "lrelu")
n = fastgan.grad_sq_norm(y)
dx, = torch.autograd.grad(n.sum(), x)
y_ref = reference.bias_act(x, None, 1, "lrelu")
dx_ref, = torch.autograd.grad(reference.grad_sq_norm(y_ref).sum(), x)
info = fastgan.backend_info()
print(json.dumps({"same": bool(torch.equal(y, y_ref) and torch.allclose(dx, dx_ref)),
                  "launches": fastgan.launch_counts(), "triton": info["triton"],
                  "triton_error": info["triton_error"], "cpu": info["cpu_tensors"],
                  "cuda": info["cuda_tensors"]}))
"""


@pytest.mark.parametrize("how", ["missing", "broken"])
def test_import_without_triton(how, tmp_path):
    """Without triton (not installed, or an installation that fails to import), import
    fastgan works, CPU tensors run the extension or the reference, and backend_info says why
    Triton is not used."""
    import json
    import os
    import subprocess
    import sys

    broken = tmp_path / "triton"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise OSError('libcuda.so: cannot open shared object')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", NO_TRITON_SCRIPT, how, str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["same"] and got["triton"] is None
    error = ("ModuleNotFoundError: import of triton halted; None in sys.modules"
             if how == "missing" else "OSError: libcuda.so: cannot open shared object")
    assert got["triton_error"] == error
    if ext.available("cpu"):
        assert got["launches"] == {"ext_bias_act": 1, "ext_bias_act_grad": 1,
                                   "ext_per_sample_dot": 1, "ext_scale_per_sample": 1}
        assert got["cpu"] == "compiled extension (torch.ops.fastgan)"
    else:
        assert got["launches"] == {}
        assert got["cpu"] == f"torch reference (triton cannot be imported: {error})"
    assert got["cuda"] == f"torch reference (triton cannot be imported: {error})"


def test_backend_info_contents(no_env):
    """backend_info() reports versions, the interpreter, CUDA, and what runs for each device."""
    import triton

    info = fastgan.backend_info()
    assert EXPECTED_INFO_KEYS <= set(info)
    assert info["torch"] == torch.__version__
    assert info["triton"] == triton.__version__ and info["triton_error"] is None
    assert info["triton_interpreter"] == backend.interpreter_enabled()
    assert info["cuda_available"] == torch.cuda.is_available()
    assert (info["cuda_device"] is None) == (not torch.cuda.is_available())
    assert info["cuda_tensors"] == CUDA_TRITON
    assert info["extension"] == ext.status()["library"]
    if backend.interpreter_enabled():
        assert "interpreter" in info["cpu_tensors"]
    elif ext.available("cpu"):
        assert info["cpu_tensors"] == "compiled extension (torch.ops.fastgan)"
    else:
        assert info["cpu_tensors"].startswith("torch reference")


def test_backend_info_says_why_the_extension_is_not_used(no_env, monkeypatch):
    """``<device>_extension`` is 'in use' or 'not used: ' and one line of why."""
    monkeypatch.setattr(ext, "_state", ext._State("lib.so", None, None))
    info = fastgan.backend_info()
    assert info["extension"] == "lib.so"
    assert info["cuda_tensors"] == CUDA_TRITON
    assert info["cuda_extension"] == (
        "not used: auto runs the Triton kernels on CUDA (the extension's CUDA kernels run when "
        "forced: FASTGAN_BACKEND=ext)")
    if backend.interpreter_enabled():
        assert info["cpu_extension"] == "not used: TRITON_INTERPRET=1 asks for the Triton kernels"
    for name in ("torch", "triton"):
        fastgan.set_backend(name)
        info = fastgan.backend_info()
        forced = f"not used: backend forced to '{name}' (from set_backend())"
        assert info["cuda_extension"] == forced
    fastgan.set_backend("ext")
    info = fastgan.backend_info()
    assert info["cuda_tensors"] == info["cpu_tensors"] == "compiled extension (torch.ops.fastgan)"
    assert info["cuda_extension"] == info["cpu_extension"] == "in use"
    monkeypatch.setattr(ext, "_state", ext._State("lib.so", None, "no CUDA kernels (demo)"))
    info = fastgan.backend_info()
    assert info["cuda_tensors"] == CUDA_TRITON
    assert info["cuda_extension"] == "not used: no CUDA kernels (demo)"


def test_backend_info_includes_registered_choices(monkeypatch):
    """Ops that choose per shape can add their choices to backend_info()."""
    monkeypatch.setitem(backend._choice_reporters, "demo_op", lambda: {"4x4": "cudnn"})
    assert fastgan.backend_info()["demo_op_choices"] == {"4x4": "cudnn"}


def test_launch_counters():
    """record_launch / launch_counts / reset_launch_counts are what the tests rely on."""
    fastgan.reset_launch_counts()
    assert fastgan.launch_counts() == {}
    backend.record_launch("k")
    backend.record_launch("k")
    counts = fastgan.launch_counts()
    assert counts == {"k": 2}
    counts["k"] = 99  # a copy: the caller cannot change the counters
    assert fastgan.launch_counts() == {"k": 2}
    fastgan.reset_launch_counts()
    assert fastgan.launch_counts() == {}
