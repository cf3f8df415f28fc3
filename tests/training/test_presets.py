"""Training configs ship with the package: found by name, the checkout's configs/ is the same files."""
from __future__ import annotations

from pathlib import Path

import pytest

from holiclip.training.config import ConfigError, find_config, load_config
from holiclip.training.presets import CONFIG_DIR, describe, shipped_configs

CHECKOUT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_shipped_configs_are_package_data_and_the_checkout_folder_is_the_same_files():
    names = shipped_configs()
    assert {"clip", "o2m", "holistic_cls", "holistic_mlp", "holistic_hybrid", "smoke"} <= set(names)
    assert {"demo/clip", "demo/holistic_cls", "ablations/texts_h2"} <= set(names)
    assert all(p.is_relative_to(CONFIG_DIR) for p in names.values())
    # one source of truth: the checkout's configs/ resolves into the package
    assert CHECKOUT_CONFIGS.resolve() == CONFIG_DIR.resolve()
    assert all(describe(p) for p in names.values())  # every file says what it is for


def test_a_name_loads_the_same_config_as_its_path(tmp_path):
    by_name = load_config("holistic_cls", ["data.train=x.jsonl"])
    assert by_name == load_config(CHECKOUT_CONFIGS / "holistic_cls.yaml", ["data.train=x.jsonl"])
    shipped = shipped_configs()["demo/clip"].resolve()
    assert find_config("demo/clip.yaml").resolve() == find_config("configs/demo/clip.yaml").resolve() == shipped
    own = tmp_path / "holistic_cls"  # an existing file wins over a shipped name
    own.write_text("optim:\n  steps: 7\n")
    assert load_config(own).optim.steps == 7


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"^holistic_csl: no such config file, .*shipped: clip, holistic_cls"):
        find_config("holistic_csl")
