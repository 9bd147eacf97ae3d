"""``python -m benchmarks`` from the repository root, or ``python path/to/benchmarks`` from any
folder: run as a folder, the repository takes the folder's place at the head of ``sys.path``,
so this checkout's ``benchmarks`` and ``fastgan`` are the ones imported."""
import sys
from pathlib import Path

if not __package__:  # python path/to/benchmarks
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.runner import main  # noqa: E402

raise SystemExit(main())
