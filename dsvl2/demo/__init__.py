"""Synthetic tasks for the demo model (grounding, reading, bar charts); see :mod:`dsvl2.demo.tasks`."""
