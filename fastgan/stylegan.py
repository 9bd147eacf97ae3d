"""fastgan as the ops of StyleGAN-family code (docs/design.md section 9).

StyleGAN2-ADA, StyleGAN3, EG3D, StyleGAN-XL, R3GAN's official code and others call the ops of
StyleGAN2-ADA's ``torch_utils/ops``: ``bias_act.bias_act`` and ``upfirdn2d.upfirdn2d``,
``filter2d``, ``upsample2d``, ``downsample2d``. Those are CUDA plugins compiled on first use,
and when the build fails they fall back to slow reference code. ``patch()`` replaces them with
fastgan's functions, which have the same signatures and semantics (``impl='ref'`` still runs a
reference: fastgan's), run Triton kernels on CUDA and the compiled extension or the reference on
CPU, and need nothing compiled at run time::

    import torch_utils.ops.bias_act, torch_utils.ops.upfirdn2d   # the codebase's own modules
    import fastgan.stylegan
    fastgan.stylegan.patch()      # from here on its networks run fastgan's ops

Their callers look the functions up on the module at each call (``bias_act.bias_act(...)``,
``upfirdn2d.upfirdn2d(...)``), and the module's own helpers call ``upfirdn2d`` by its module
global, so replacing the module attributes is enough. Nothing of those codebases is imported
or copied here: ``patch()`` only touches modules that are already imported.
"""
from __future__ import annotations

import sys

# The functions patch() replaces, per module (relative to the package, "torch_utils").
REPLACED = {
    "ops.bias_act": ("bias_act",),
    "ops.upfirdn2d": ("upfirdn2d", "filter2d", "upsample2d", "downsample2d"),
}

_originals: dict[str, tuple[object, str, object]] = {}  # "module.function" -> (module, name, fn)


def _fastgan_function(name: str):
    import fastgan
    return getattr(fastgan, name)


def patch(package: str = "torch_utils") -> dict:
    """Replace ``<package>.ops.bias_act.bias_act`` and the ``upfirdn2d`` functions of
    ``<package>.ops.upfirdn2d`` with fastgan's, in whichever of these modules are imported
    (import them first). Returns ``{"<module>.<function>": the replaced function}`` for what
    this call replaced; a function already patched is left as it is. ``unpatch()`` restores
    them."""
    replaced = {}
    for relative, names in REPLACED.items():
        module = sys.modules.get(f"{package}.{relative}")
        if module is None:
            continue
        for name in names:
            qualified = f"{module.__name__}.{name}"
            if qualified in _originals:
                continue
            original = getattr(module, name, None)
            if original is None:
                raise AttributeError(f"{module.__name__} has no function {name!r}; it does not "
                                     "look like StyleGAN2-ADA's torch_utils.ops module")
            _originals[qualified] = (module, name, original)
            setattr(module, name, _fastgan_function(name))
            replaced[qualified] = original
    return replaced


def unpatch() -> dict:
    """Restore every function ``patch()`` replaced; returns ``{"<module>.<function>": the
    restored function}``."""
    restored = {}
    for qualified, (module, name, original) in list(_originals.items()):
        setattr(module, name, original)
        restored[qualified] = original
        del _originals[qualified]
    return restored


def patched() -> list[str]:
    """The functions replaced now, as ``"<module>.<function>"``."""
    return sorted(_originals)
