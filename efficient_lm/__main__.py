"""`python -m efficient_lm ...` is `elm ...`."""
import sys

from efficient_lm.cli import main

sys.exit(main())
