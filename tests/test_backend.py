"""Which implementation runs (fastgan.backend): FASTGAN_BACKEND, set_backend(), the automatic
rule, backend_info(), and the launch counters that prove which one ran."""
import pytest
import torch

import fastgan
from fastgan import backend, reference
from op_helpers import DEVICE, leaf, randn

EXPECTED_INFO_KEYS = {"backend", "backend_source", "torch", "triton", "triton_interpreter",
                      "cuda_available", "cuda_device", "cuda_tensors", "cpu_tensors"}


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("FASTGAN_BACKEND", raising=False)


@pytest.fixture
def interpreter_off(monkeypatch):
    """CPU tensors as on a machine where TRITON_INTERPRET was not set."""
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)


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
    """By default, tensors on DEVICE (CUDA, or CPU with the interpreter) run the kernels."""
    _run_ops()
    counts = launches()
    for kernel in ("bias_act_fwd", "bias_act_grad", "per_sample_dot", "scale_per_sample"):
        assert counts.get(kernel, 0) > 0, counts


def test_auto_runs_reference_for_cpu_without_interpreter(no_env, interpreter_off, launches):
    """CPU tensors without TRITON_INTERPRET run the reference: same numbers, no launch."""
    got = _run_ops(device="cpu")
    assert launches() == {}
    for a, b in zip(got, _run_ops(device="cpu", ops=reference)):
        assert torch.equal(a, b)
    assert fastgan.backend_info()["cpu_tensors"].startswith("torch reference")


def test_auto_without_triton_runs_reference(no_env, monkeypatch, launches):
    """No triton package: auto falls back to the reference, forced 'triton' explains why."""
    monkeypatch.setattr(backend, "triton_available", lambda: False)
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
    assert launches().get("bias_act_fwd", 0) > 0


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


def test_backend_info_contents(no_env):
    """backend_info() reports versions, the interpreter, CUDA, and what runs for each device."""
    import triton

    info = fastgan.backend_info()
    assert EXPECTED_INFO_KEYS <= set(info)
    assert info["torch"] == torch.__version__
    assert info["triton"] == triton.__version__
    assert info["triton_interpreter"] == backend.interpreter_enabled()
    assert info["cuda_available"] == torch.cuda.is_available()
    assert (info["cuda_device"] is None) == (not torch.cuda.is_available())
    assert info["cuda_tensors"] == "Triton kernels, compiled"
    if backend.interpreter_enabled():
        assert "interpreter" in info["cpu_tensors"]
    else:
        assert info["cpu_tensors"].startswith("torch reference")


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
