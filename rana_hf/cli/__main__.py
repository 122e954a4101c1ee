"""`python -m rana_hf.cli ...`: the same as `rana-hf ...`."""

import sys

from . import main

sys.exit(main())
