"""Pre-tokenised shards (``data shard --tokenizer`` / ``caption merge --shards --tokenizer``):
training stacks the stored ids, tokenising nothing, into the very batches tokenising gives;
a shard written with another tokenizer is refused, naming the shard and both tokenizers."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from typer.testing import CliRunner

from holiclip.cli.app import app
from holiclip.data import tokens as tokens_mod
from holiclip.data.loader import Collate
from holiclip.data.records import DataError
from holiclip.data.sharding import shard_manifest
from holiclip.data.shards import ShardStream
from holiclip.data.webdataset import TOKENS_MEMBER, iter_raw

from tests.helpers.datasets import make_dataset
from tests.helpers.shards import to_tensor

LONG = " ".join(f"word{i}" for i in range(120))  # past 77 tokens: counted as truncated


def _manifest(root: Path) -> Path:
    """make_dataset's rows; row 2 has a caption past the context, row 5 no 'detail' (filled from 'web')."""
    path = make_dataset(root, n=12)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[2]["captions"]["main"] = LONG
    del rows[5]["captions"]["detail"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _batches(out: Path, tokenizer, slots=("detail", "web", "main")) -> list[dict]:
    s = ShardStream(str(out), list(slots), 4, to_tensor, Collate(tokenizer, 77), shuffle_buffer=5, seed=3,
                    missing_slot_policy="fill:web")
    s.set_epoch(1)
    return list(s.loader(workers=0))


@pytest.fixture(scope="module")
def tokenizer():
    return SimpleTokenizer(context_length=77)


def test_pretokenised_shards_give_the_batches_tokenising_gives_and_tokenise_nothing(tmp_path, tokenizer, monkeypatch):
    path = _manifest(tmp_path)
    plain, tokens = tmp_path / "plain", tmp_path / "tokens"
    shard_manifest(path, plain, shard_size=5, progress=False)
    shard_manifest(path, tokens, shard_size=5, progress=False, tokenizer=tokenizer)
    raw = next(iter_raw(str(tokens), "test"))
    ids = np.load(io.BytesIO(raw[TOKENS_MEMBER]))
    meta = json.loads(raw["json"])["tokens"]
    assert ids.dtype == np.uint16 and ids.shape == (3, 77) and meta["slots"] == ["web", "detail", "main"]
    assert meta["tokenizer"]["name"] == "SimpleTokenizer (context 77)"

    expected = _batches(plain, tokenizer)
    calls = []
    monkeypatch.setattr(SimpleTokenizer, "__call__", lambda self, *a, **k: calls.append(1))
    monkeypatch.setattr(SimpleTokenizer, "encode", lambda self, *a, **k: calls.append(1))  # tokenize's one pass
    monkeypatch.setattr(tokens_mod, "token_lengths", lambda *a: calls.append(1))  # the second pass of other tokenizers
    got = _batches(tokens, tokenizer)
    assert not calls  # nothing tokenised
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        assert a["texts"].dtype == b["texts"].dtype == torch.int64
        assert torch.equal(a["texts"], b["texts"]) and torch.equal(a["images"], b["images"])
        assert torch.equal(a["index"], b["index"]) and a["truncated"] == b["truncated"]
    assert sum(b["truncated"] for b in got) == 1  # row 2's long caption, counted from the stored lengths
    assert 5 in torch.cat([b["index"] for b in got]).tolist()  # the filled slot took web's stored row


def test_shards_of_another_tokenizer_are_refused_naming_both(tmp_path, tokenizer):
    out = tmp_path / "tokens"
    shard_manifest(_manifest(tmp_path), out, shard_size=5, progress=False, tokenizer=tokenizer)
    with pytest.raises(DataError) as err:
        _batches(out, SimpleTokenizer(context_length=32))
    message = str(err.value)
    assert re.match(rf"{re.escape(str(out))}/shard-00000\d\.tar:\d{{9}}: its shard was pre-tokenised with "
                    r"SimpleTokenizer \(context 77\), digest [0-9a-f]{12}; this run tokenises with "
                    r"SimpleTokenizer \(context 32\), digest [0-9a-f]{12}\.", message), message
    assert "Traceback" not in message


def test_adding_a_tokenizer_rewrites_the_shards(tmp_path, tokenizer):
    path, out = _manifest(tmp_path), tmp_path / "s"
    assert shard_manifest(path, out, shard_size=5, progress=False).written == 3
    rep = shard_manifest(path, out, shard_size=5, progress=False, tokenizer=tokenizer)
    assert (rep.written, rep.kept) == (3, 0)  # shards without ids are not kept as finished
    assert shard_manifest(path, out, shard_size=5, progress=False, tokenizer=tokenizer).kept == 3
    assert all(TOKENS_MEMBER in raw for raw in iter_raw(str(out), "test"))


def test_cli_refuses_an_unknown_tokenizer_and_a_jsonl_with_one(tmp_path):
    path = _manifest(tmp_path)
    res = CliRunner().invoke(app, ["data", "shard", str(path), "--out", str(tmp_path / "s"), "--tokenizer", "nope"])
    assert res.exit_code == 2 and "--tokenizer: unknown model 'nope'" in res.output
    res = CliRunner().invoke(app, ["caption", "merge", str(path), "--out", str(tmp_path / "t.jsonl"),
                                   "--tokenizer", "ViT-B-16"])
    assert res.exit_code == 2 and "--tokenizer stores token ids in shards" in res.output


def test_training_on_pretokenised_shards_gives_the_same_weights(tmp_path):
    from holiclip.models.registry import get_tokenizer
    from holiclip.training.trainer import train

    from tests.helpers.training import cfg_for, weights

    path = _manifest(tmp_path)
    shard_manifest(path, tmp_path / "plain", shard_size=5, progress=False)
    shard_manifest(path, tmp_path / "tokens", shard_size=5, progress=False, tokenizer=get_tokenizer("holi-tiny"))
    runs = {}
    for name in ("plain", "tokens"):
        out = train(cfg_for(tmp_path, tmp_path / name, tmp_path / f"run-{name}", "optim.steps=3",
                            "optim.batch_size=4", "data.missing_slot_policy=fill:web", "data.workers=0"))
        runs[name] = (out["counters"], weights(tmp_path / f"run-{name}"))
    (ca, a), (cb, b) = runs["plain"], runs["tokens"]
    assert ca == cb and ca["truncated"] >= 1  # row 2's long caption, from the stored lengths
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_tokens_member_is_a_bad_row_named_by_shard_and_key(tmp_path, tokenizer):
    from tests.helpers.shards import write_shards

    def damaged(n, sample):
        row = json.loads(sample["json"])
        row["tokens"] = {"tokenizer": {"name": "x", "digest": "y"}, "slots": ["web"], "lengths": [3]}
        return {**sample, "json": json.dumps(row).encode(), TOKENS_MEMBER: b"not an npy file"}

    write_shards(tmp_path, [4], members=lambda n, s: damaged(n, s) if n == 2 else s)
    with pytest.raises(DataError, match=r"shard-000000\.tar:000002: unreadable tokens\.npy member or json 'tokens' "
                                        r"field .*data\.on_bad_row=skip skips such samples"):
        list(ShardStream(str(tmp_path), ["web"], 4, to_tensor, Collate(tokenizer, 77), shuffle_buffer=0).loader())
