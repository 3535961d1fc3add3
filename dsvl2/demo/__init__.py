"""Synthetic tasks for the demo model (grounding, reading, bar charts); see :mod:`dsvl2.demo.tasks`.

The demo is an application of :mod:`dsvl2.training` and :mod:`dsvl2.evaluation`; nothing below it imports
it. The shipped model's directory lives in :mod:`dsvl2.assets` (re-exported here).
"""

from ..assets import MODEL_DIR, default_model_dir

__all__ = ["MODEL_DIR", "default_model_dir"]
