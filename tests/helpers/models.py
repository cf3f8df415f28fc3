"""Model configs and inputs for the model tests."""
from __future__ import annotations

# Registry configs the model tests run on (timm-style parametrisation); ViT-B ones are too slow.
SMALL_CONFIGS = ("holi-tiny", "holi-small")
