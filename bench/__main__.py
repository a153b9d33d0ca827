"""Entry point: ``python -m bench [run|static|smoke] [options]`` (see bench/cli.py)."""

import sys

from .cli import main

sys.exit(main())
