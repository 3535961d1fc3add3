"""``python -m dsvl2.evaluation ...``: the same as ``dsvl2 eval ...``."""

import sys

from dsvl2.cli.eval import main

sys.exit(main())
