"""`python -m pipelines.data.prepare ARGS` == `sora data prepare ARGS` (the same parser and one-line errors)."""

import sys

from pipelines.cli import main

sys.exit(main(["data", "prepare", *sys.argv[1:]]))
