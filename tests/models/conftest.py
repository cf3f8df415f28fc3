"""Model-test fixtures: configs registered for a test (or the session) and removed afterwards."""
from __future__ import annotations

import pytest

from tests.helpers.models import ONE_LAYER


@pytest.fixture(scope="session")
def one_layer_config() -> str:
    """The name of a one-layer ViT config ("test-one-layer"), registered while the tests that ask for it run."""
    from holiclip.models import registry

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._EXTRA_CONFIGS, "test-one-layer", ONE_LAYER)
        yield "test-one-layer"


@pytest.fixture
def model_registry(monkeypatch):
    """Configs the test registers (register_model_config, load_model) are gone after it."""
    from holiclip.models import registry

    monkeypatch.setattr(registry, "_EXTRA_CONFIGS", dict(registry._EXTRA_CONFIGS))
    return registry
