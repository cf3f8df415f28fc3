"""Which (main object, background colour) combinations each split may use.

Every class gets ``n_test`` background families reserved for test (and the held-out
style sets), ``n_val`` for val and the rest for train, rotated so every family occurs in
every split. A test scene's main object was therefore never seen on that background
colour in training ("unseen combinations"); build.py also keeps the exact
(object set, background) combination of val/test scenes out of train.
"""
from __future__ import annotations

import numpy as np

TRAIN, VAL, TEST = 0, 1, 2


def combination_table(n_classes: int, n_families: int, seed: int, n_val: int = 1, n_test: int = 2) -> np.ndarray:
    """int8 (n_classes, n_families): 0 train, 1 val, 2 test."""
    if n_val + n_test >= n_families:
        raise ValueError("need at least one background family left for training")
    rng = np.random.default_rng([seed, 7919])
    offset = rng.permutation(n_families)
    table = np.zeros((n_classes, n_families), np.int8)
    for c in range(n_classes):
        # Consecutive families (in a shuffled order) starting at a class-dependent offset.
        start = (c * (n_val + n_test)) % n_families
        fams = [offset[(start + j) % n_families] for j in range(n_val + n_test)]
        table[c, fams[:n_val]] = VAL
        table[c, fams[n_val:]] = TEST
    return table


def balanced_mains(rng: np.random.Generator, n_scenes: int, n_classes: int) -> np.ndarray:
    """Main-object classes for a split: every class equally often (up to one)."""
    reps = -(-n_scenes // n_classes)
    return np.concatenate([rng.permutation(n_classes) for _ in range(reps)])[:n_scenes]
