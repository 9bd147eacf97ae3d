"""fastgan.stylegan.patch(): replacing a StyleGAN2-ADA-style ``torch_utils.ops`` with fastgan's
ops, on a stand-in package the test writes (same module names and signatures; their code is
not needed, nor copied)."""
import importlib
import sys
import textwrap

import pytest
import torch

import fastgan
import fastgan.stylegan

# A stand-in torch_utils: its ops record their calls and compute with fastgan's reference;
# "networks" calls them as StyleGAN2-ADA's code does (module attribute at each call, and
# filter2d calling the module global upfirdn2d).
STAND_IN = {
    "__init__.py": "",
    "ops/__init__.py": "",
    "ops/bias_act.py": """
        from fastgan import reference
        calls = []

        def bias_act(x, b=None, dim=1, act='linear', alpha=None, gain=None, clamp=None,
                     impl='cuda'):
            calls.append('bias_act')
            return reference.bias_act(x, b, dim, act, alpha, gain, clamp)
    """,
    "ops/upfirdn2d.py": """
        from fastgan import reference
        calls = []

        def setup_filter(f, device=None, normalize=True, flip_filter=False, gain=1,
                         separable=None):
            raise AssertionError('not replaced, not called here')

        def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1, impl='cuda'):
            calls.append('upfirdn2d')
            return reference.upfirdn2d(x, f, up, down, padding, flip_filter, gain)

        def filter2d(x, f, padding=0, flip_filter=False, gain=1, impl='cuda'):
            calls.append('filter2d')
            return upfirdn2d(x, f, padding=padding, flip_filter=flip_filter, gain=gain)

        def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, impl='cuda'):
            raise AssertionError('stand-in')

        def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, impl='cuda'):
            raise AssertionError('stand-in')
    """,
    "networks.py": """
        from torch_utils.ops import bias_act, upfirdn2d

        def block(x, b, f):
            x = upfirdn2d.upfirdn2d(x, f, down=2, padding=1)
            return bias_act.bias_act(x, b, act='lrelu', clamp=256)
    """,
}


@pytest.fixture
def torch_utils(tmp_path, monkeypatch):
    """The stand-in package, imported (bias_act, upfirdn2d and networks); unpatched after."""
    for name, text in STAND_IN.items():
        path = tmp_path / "torch_utils" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "torch_utils"]:
        monkeypatch.delitem(sys.modules, name)
    modules = {name: importlib.import_module(f"torch_utils.{name}")
               for name in ("ops.bias_act", "ops.upfirdn2d", "networks")}
    yield modules
    fastgan.stylegan.unpatch()
    for name in [m for m in sys.modules if m.split(".")[0] == "torch_utils"]:
        del sys.modules[name]


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    f = fastgan.setup_filter([1, 3, 3, 1])
    return x, b, f


def test_patch_replaces_the_imported_ops_and_unpatch_restores_them(torch_utils, launches):
    ops_bias_act, ops_upfirdn2d = torch_utils["ops.bias_act"], torch_utils["ops.upfirdn2d"]
    originals = {"torch_utils.ops.bias_act.bias_act": ops_bias_act.bias_act,
                 **{f"torch_utils.ops.upfirdn2d.{name}": getattr(ops_upfirdn2d, name)
                    for name in ("upfirdn2d", "filter2d", "upsample2d", "downsample2d")}}
    x, b, f = _inputs()
    expected = torch_utils["networks"].block(x, b, f)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, b))
    assert ops_bias_act.calls == ["bias_act"] and ops_upfirdn2d.calls == ["upfirdn2d"]

    assert fastgan.stylegan.patch() == originals
    assert fastgan.stylegan.patched() == sorted(originals)
    assert ops_bias_act.bias_act is fastgan.bias_act
    assert ops_upfirdn2d.filter2d is fastgan.filter2d
    assert ops_upfirdn2d.setup_filter is not fastgan.setup_filter  # not an op: left alone
    assert fastgan.stylegan.patch() == {}  # already patched
    fastgan.reset_launch_counts()
    y = torch_utils["networks"].block(x, b, f)
    grads = torch.autograd.grad(y.square().sum(), (x, b))
    assert launches() == {"upfirdn2d": 2, "bias_act_fwd": 1, "bias_act_grad": 1}
    assert ops_bias_act.calls == ["bias_act"] and ops_upfirdn2d.calls == ["upfirdn2d"]
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    assert fastgan.stylegan.unpatch() == originals
    assert fastgan.stylegan.patched() == []
    assert ops_bias_act.bias_act is originals["torch_utils.ops.bias_act.bias_act"]
    torch_utils["networks"].block(x, b, f)
    assert ops_bias_act.calls == ["bias_act"] * 2


def test_only_imported_modules_are_patched(tmp_path, monkeypatch):
    """A codebase that imported only bias_act: only it is replaced; another package name."""
    package = tmp_path / "sg3_utils" / "ops"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "bias_act.py").write_text(textwrap.dedent(STAND_IN["ops/bias_act.py"]))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("sg3_utils.ops.bias_act")
    try:
        assert fastgan.stylegan.patch() == {}  # no torch_utils imported
        replaced = fastgan.stylegan.patch("sg3_utils")
        assert list(replaced) == ["sg3_utils.ops.bias_act.bias_act"]
        assert module.bias_act is fastgan.bias_act
    finally:
        fastgan.stylegan.unpatch()
        for name in [m for m in sys.modules if m.split(".")[0] == "sg3_utils"]:
            del sys.modules[name]
    assert module.bias_act is not fastgan.bias_act


def test_a_module_without_the_function_is_a_clear_error(tmp_path, monkeypatch):
    package = tmp_path / "odd_utils" / "ops"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "bias_act.py").write_text("def other():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("odd_utils.ops.bias_act")
    try:
        with pytest.raises(AttributeError, match="odd_utils.ops.bias_act has no function "
                                                 "'bias_act'; it does not look like"):
            fastgan.stylegan.patch("odd_utils")
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "odd_utils"]:
            del sys.modules[name]

