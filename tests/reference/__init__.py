"""Independent references from PyPI (transformers) loaded with dsvl2's weights; see ``adapters.py``."""
