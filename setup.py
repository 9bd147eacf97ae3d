"""Plain setuptools entry point; the metadata lives in pyproject.toml.

``pip install -e .`` compiles nothing. ``FASTGAN_BUILD_EXT=1 pip install --no-build-isolation
-e .`` also compiles the optional C++/CUDA extension (sources in kernels/) ahead of time into
the module ``fastgan._C_avx2`` (on a CPU with AVX2, FMA and F16C, whose code it then uses) or
``fastgan._C_base`` (portable), with ninja: the CPU kernels, plus the CUDA kernels when the
installed torch has CUDA and nvcc is found. The name records the CPU the build needs:
fastgan/ext.py refuses an ``avx2`` build on a CPU without AVX2 instead of crashing there
(docs/design.md section 8).
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def extension_options() -> dict:
    """``ext_modules`` and ``cmdclass`` for the extension, or nothing without
    ``FASTGAN_BUILD_EXT=1``."""
    if os.environ.get("FASTGAN_BUILD_EXT") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # fastgan/ext.py on its own (fastgan's dependencies may not be installed yet): the same
    # sources and flags as the just-in-time build.
    spec = importlib.util.spec_from_file_location("_fastgan_ext_build",
                                                  ROOT / "fastgan" / "ext.py")
    ext = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ext  # dataclasses look their module up there
    spec.loader.exec_module(ext)
    with_cuda = ext.build_with_cuda()
    flags = ext.build_flags(with_cuda)
    make = CUDAExtension if with_cuda else CppExtension
    module = make(ext.aot_module(ext.cpu_capability()),
                  [str(p.relative_to(ROOT)) for p in ext.sources(with_cuda)],
                  extra_compile_args={"cxx": flags["cxx"], "nvcc": flags["nvcc"]},
                  extra_link_args=flags["ld"])
    return {"ext_modules": [module], "cmdclass": {"build_ext": BuildExtension}}


setup(**extension_options())
