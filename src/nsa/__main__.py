"""`python -m nsa ...`: the `nsa` command without its console script (e.g. with the source on PYTHONPATH)."""
import sys

from .cli import main

sys.exit(main())
