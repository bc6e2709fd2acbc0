"""`python -m stacks ...`: the stacks' command line (see stacks/cli.py)."""

import sys

from stacks.cli import main

sys.exit(main())
