"""`python -m training.paper`."""

import sys

from training.paper.cli import run

sys.exit(run())
