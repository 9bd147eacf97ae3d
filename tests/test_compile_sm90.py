"""The compiled (non-interpreted) kernels build for sm_90 with the installed Triton.

The rest of the CPU suite runs the kernels in the interpreter, which never compiles them;
this runs tests/sm90_compile.py in a subprocess with the interpreter off.
"""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("sm90_compile.py")


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=600)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "compiled" in report and " 0 failed" in report, report
