"""``python -m fastgan COMMAND``: see ``python -m fastgan --help``."""
import sys

from fastgan.train.cli import main

sys.exit(main())
