"""`python -m flashnb ...`: the same as the `flashnb` command."""

import sys

from flashnb.cli import main

sys.exit(main())
