"""`python -m pipelines.probe ARGS` = `xtra probe ARGS` (kept for `ray job submit` users)."""

import sys

from pipelines.cli import main

sys.exit(main(["probe", *sys.argv[1:]]))
