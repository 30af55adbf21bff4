"""`python -m tachylm` runs the command-line interface."""

import sys

from tachylm.cli import main

sys.exit(main())
