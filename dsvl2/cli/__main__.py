"""``python -m dsvl2.cli ...`` (e.g. under ``torchrun``): the same as ``dsvl2 ...``."""

import sys

from dsvl2.cli import main

sys.exit(main())
