"""`python -m pipelines.pretrain ARGS` = `xtra pretrain ARGS` (kept for `ray job submit` users)."""

import sys

from pipelines.cli import main

sys.exit(main(["pretrain", *sys.argv[1:]]))
