"""Splits: the test splits hold (object, background) combinations unseen in training."""
from __future__ import annotations

from holiclip.benchmarks.emoji.data import backgrounds as bgs
from holiclip.benchmarks.emoji.data.splits import TEST, TRAIN, VAL, combination_table

from tests.helpers.emoji import all_rows


def test_test_splits_hold_unseen_combinations(tiny):
    root, meta = tiny
    rows = all_rows(root)
    train_pairs = {(r["main"], r["background"]) for r in rows["train"]}
    train_sets = {(frozenset(o["class"] for o in r["objects"]), r["background"]) for r in rows["train"]}
    for split in ("val", "test", "test_heldout", "test_heldout_openmoji"):
        for r in rows[split]:
            assert (r["main"], r["background"]) not in train_pairs
            assert (frozenset(o["class"] for o in r["objects"]), r["background"]) not in train_sets
    table = combination_table(12, len(bgs.FAMILIES), 0)
    assert ((table == VAL).sum(1) == 1).all() and ((table == TEST).sum(1) == 2).all()
    for kind in (TRAIN, VAL, TEST):  # every background family occurs in every split
        assert ((table == kind).sum(0) > 0).all()
