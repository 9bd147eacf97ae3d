"""Start-up: ``import fastgan`` and ``python -m fastgan train --help`` import nothing heavy that
they do not need, and load no compiled extension. (How long they take is measured, not
tested: ``python -X importtime``.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Imported only when first needed: torch._dynamo (a second; torch.compile and torch.optim
# bring it), the plotting, image and metrics libraries of the trainer's outputs.
HEAVY = ("torch._dynamo", "matplotlib", "scipy", "sklearn", "PIL")

SCRIPT = """
import contextlib, io, json, runpy, sys
if sys.argv[1] == "help":
    sys.argv = ["fastgan", "train", "--help"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        runpy.run_module("fastgan", run_name="__main__")
else:
    import fastgan
import fastgan.ext
print(json.dumps({"heavy": [m for m in %r if m in sys.modules],
                  "extension_loaded": fastgan.ext._state is not None}))
""" % (HEAVY,)


@pytest.mark.parametrize("what", ["import", "help"])
def test_start_up_imports_nothing_heavy(what):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", SCRIPT, what], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"heavy": [],
                                                                "extension_loaded": False}
