"""`python -m pipeline ...` (what `accelerate launch -m pipeline run RECIPE` executes on every process)."""

import sys

from pipeline.cli import main

sys.exit(main())
