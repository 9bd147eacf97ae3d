"""The extension's CUDA sources compile without a GPU or a CUDA build of torch.

Each ``kernels/cuda_*.cu`` is compiled with ``nvcc -c`` for sm_80 and sm_90 with the flags
PyTorch gives nvcc (no implicit half conversions), warnings as errors. The ATen glue
(``cuda_glue.cpp``) and the CUDA registration in ``ops.cpp`` are checked by the C++ compiler
against this torch's headers and the CUDA toolkit's (docs/design.md).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from fastgan import ext

NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "c++"))
ARCHS = ("80", "90")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def cuda_sources():
    return [p for p in ext.sources(with_cuda=True) if p.suffix == ".cu"]


def cuda_include():
    """The CUDA toolkit's include folder (nvcc on PATH may be a wrapper script)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             Path(NVCC).resolve().parent.parent, "/usr/local/cuda"]
    for home in filter(None, homes):
        if Path(home, "include", "cuda_runtime.h").is_file():
            return str(Path(home, "include"))
    return None


def run_concurrently(commands):
    """Run ``{name: argv}`` at once (two cores compile two files in the time of one); assert
    that each succeeded, with its output otherwise."""
    running = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
               for name, argv in commands.items()}
    failures = []
    for name, process in running.items():
        output, _ = process.communicate(timeout=300)
        if process.returncode != 0:
            failures.append(f"{name}:\n{output}")
    assert not failures, "\n".join(failures)


def test_cuda_kernels_compile(tmp_path):
    assert {p.name for p in cuda_sources()} == {"cuda_bias_act.cu", "cuda_per_sample.cu"}
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    run_concurrently({
        source.name: [NVCC, "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o"),
                      "-std=c++17", "-O3", *gencode, *cpp_extension.COMMON_NVCC_FLAGS,
                      "--Werror", "all-warnings"]
        for source in cuda_sources()})
    for source in cuda_sources():
        assert (tmp_path / f"{source.stem}.o").stat().st_size > 0


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_cuda_glue_compiles(tmp_path):
    """cuda_glue.cpp and ops.cpp with FASTGAN_WITH_CUDA, against this torch's headers. CPU
    builds of torch ship ATen's CUDA headers without the generated
    c10/cuda/impl/cuda_cmake_macros.h; a stand-in defines what it would."""
    include = cuda_include()
    assert include is not None, f"no CUDA toolkit headers next to {NVCC}; set CUDA_HOME"
    folders = cpp_extension.include_paths() + [include]
    if not any(Path(f, "c10/cuda/impl/cuda_cmake_macros.h").is_file() for f in folders):
        stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        folders.append(str(tmp_path))
    flags = ["-fsyntax-only", "-std=c++20", "-Wall", "-Werror", "-DFASTGAN_WITH_CUDA"]
    run_concurrently({
        name: [CXX, *flags, *[f"-isystem{f}" for f in folders], str(ext.KERNELS_DIR / name)]
        for name in ("cuda_glue.cpp", "ops.cpp")})
