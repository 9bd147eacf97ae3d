"""Plain setuptools entry point; the metadata lives in pyproject.toml.

``pip install -e .`` compiles nothing. ``FASTGAN_BUILD_EXT=1 pip install --no-build-isolation
-e .`` also compiles the optional C++/CUDA extension (sources in kernels/) ahead of time into
the module ``fastgan._C_avx2`` (on a CPU with AVX2, FMA and F16C, whose code it then uses) or
``fastgan._C_base`` (portable), with ninja: the CPU kernels, plus the CUDA kernels when the
installed torch has CUDA and nvcc is found. The name records the CPU the build needs:
fastgan/ext.py refuses an ``avx2`` build on a CPU without AVX2 instead of crashing there
(docs/design.md section 8). Beside the module, ``_C_<cpu>.sources`` records the digest of the
sources it was built from, so that a checkout with newer kernels does not load it.

A build that fails (no compiler, a compiler error) never fails the installation: fastgan is
installed without the extension, the reason is printed (``pip install -v`` shows it) and kept
in ``fastgan/_C_build_error.txt``, which ``fastgan.backend_info()`` quotes.
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
    capability = ext.cpu_capability()
    module = make(ext.aot_module(capability),
                  [str(p.relative_to(ROOT)) for p in ext.sources(with_cuda)],
                  extra_compile_args={"cxx": flags["cxx"], "nvcc": flags["nvcc"]},
                  extra_link_args=flags["ld"])

    class BuildOptionalExtension(BuildExtension):
        """Builds the extension and records its sources' digest beside it; where the build
        fails, says why and lets the installation go on without it."""

        def run(self):
            built = Path(self.get_ext_fullpath(module.name))
            error_file = built.parent / ext.AOT_BUILD_ERROR
            try:
                super().run()
            except Exception as e:  # a missing or failing compiler, ninja, nvcc
                reason = ext._one_line(e)
                print(f"fastgan: the optional compiled extension was not built ({reason}); "
                      f"fastgan is installed without it (Triton kernels or the reference run "
                      f"instead). Build it later with `{ext.BUILD_COMMAND}`.", file=sys.stderr)
                built.parent.mkdir(parents=True, exist_ok=True)
                error_file.write_text(reason + "\n")
                return
            error_file.unlink(missing_ok=True)
            ext.aot_sources_record(built, capability).write_text(ext.sources_digest() + "\n")

    return {"ext_modules": [module], "cmdclass": {"build_ext": BuildOptionalExtension}}


setup(**extension_options())
