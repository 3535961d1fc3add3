"""``python -m dsvl2.evaluation ...``: the same as ``dsvl2 eval ...``."""

import sys

from dsvl2.evaluation.run import main

sys.exit(main())
