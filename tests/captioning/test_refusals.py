"""Refused or empty answers: retried under --retry-refusals; without retries they are failures that
`caption run` reports and a re-run sends again, and `caption merge` and `caption stats` count the
same slots as missing (one idea of "captioned" across the three commands)."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from typer.testing import CliRunner

from holiclip.captioning.merge import merge_captions
from holiclip.captioning.quality import is_caption
from holiclip.captioning.stats import compute_stats
from holiclip.cli.caption import app

from tests.helpers.captioning import env_with_key, make_images, read_jsonl
from tests.helpers.loopback import REFUSAL, Faults, LoopbackServer

PERSP = ("detail", "style")
N_IMAGES = 14


def caption(url: str, imgs: Path, out: Path, *extra: str):
    args = ["run", "--images", str(imgs), "--backend", "openai", "--model", "fake-vlm", "--base-url", url,
            "--perspectives", ",".join(PERSP), "--out", str(out), "--concurrency", "2", "--no-progress", *extra]
    return CliRunner().invoke(app, args, env=env_with_key(None))


def sent(srv: LoopbackServer, since: int = 0) -> Counter:
    """(image sha, perspective prompt) of the requests the server got."""
    return Counter((s.image_sha, s.prompt) for s in srv.seen[since:])


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def missing_counts(out: Path) -> tuple[Counter, dict[str, int], int]:
    """What merge and stats count as missing per slot, and stats' images with every slot."""
    rep = merge_captions([out], out.parent / "train.jsonl", missing="drop")
    st = compute_stats([out], diversity=False)
    return +rep.missing, {s: v.missing for s, v in st.per_slot.items() if v.missing}, st.complete_images


def test_refusals_are_retried_and_all_get_captioned(tmp_path):
    make_images(tmp_path / "imgs", N_IMAGES)
    with LoopbackServer(faults=Faults(rate_refuse=1 / 7)) as srv:
        res = caption(srv.url, tmp_path / "imgs", tmp_path / "out")
        refused = [s for s in srv.seen if s.outcome == "refuse"]
    assert res.exit_code == 0, res.output
    assert refused  # the server did refuse some (deterministically, 1 in 7 pairs)
    assert f"{len(refused)} refused or empty answers asked again; 0 failures" in res.output
    rows = read_jsonl(tmp_path / "out" / "captions.jsonl")
    assert len(rows) == N_IMAGES * len(PERSP) and all(is_caption(r["text"]) for r in rows)
    assert missing_counts(tmp_path / "out") == (Counter(), {}, N_IMAGES)


def test_without_retries_run_merge_stats_and_rerun_agree_on_the_refused_slots(tmp_path):
    make_images(tmp_path / "imgs", N_IMAGES)
    out = tmp_path / "out"
    with LoopbackServer(faults=Faults(rate_refuse=1 / 7)) as srv:
        first = caption(srv.url, tmp_path / "imgs", out, "--retry-refusals", "0")
        refused = Counter((s.image_sha, s.prompt) for s in srv.seen if s.outcome == "refuse")
        prompts = {s.prompt for s in srv.seen}
        assert refused and first.exit_code == 1, first.output
        assert f"{sum(refused.values())} failures" in first.output  # run reports them, not 0
        failures = read_jsonl(out / "failures.jsonl")
        assert all(f["error"].startswith("refused answer") and REFUSAL[:20] in f["error"] for f in failures)
        rows = read_jsonl(out / "captions.jsonl")
        assert len(rows) == N_IMAGES * len(PERSP) - len(refused)  # a refusal is never a caption row
        by_slot = Counter(f["perspective"] for f in failures)

        # merge and stats count exactly those slots as missing; the default merge asks for a re-run
        merged, stated, complete = missing_counts(out)
        assert merged == by_slot and stated == dict(by_slot)
        assert complete == N_IMAGES - len({f["image"] for f in failures})
        refuse = CliRunner().invoke(app, ["merge", str(out), "--out", str(tmp_path / "t.jsonl")])
        assert refuse.exit_code == 2 and "re-run" in refuse.output

        # the re-run sends exactly the refused requests (answered this time), and then all agree
        before = len(srv.seen)
        again = caption(srv.url, tmp_path / "imgs", out, "--retry-refusals", "0")
        assert again.exit_code == 0, again.output
        assert sent(srv, before) == refused
        assert len(prompts) == len(PERSP)
    assert missing_counts(out) == (Counter(), {}, N_IMAGES)


def test_a_refused_row_left_by_an_older_version_is_captioned_again_and_merged(tmp_path):
    imgs = make_images(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    with LoopbackServer() as srv:
        assert caption(srv.url, tmp_path / "imgs", out).exit_code == 0
        rows = read_jsonl(out / "captions.jsonl")
        old = {**rows[0], "text": "Sorry, I cannot describe this image."}  # as an older version kept it
        (out / "captions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in [old, *rows[1:]]), encoding="utf-8")
        before = len(srv.seen)
        assert caption(srv.url, tmp_path / "imgs", out).exit_code == 0
        assert list(sent(srv, before)) == [(sha(old["image"]), old["prompt"])]
    assert len(read_jsonl(out / "captions.jsonl")) == len(rows) + 1
    assert missing_counts(out) == (Counter(), {}, len(imgs))
    merge_captions([out], tmp_path / "train.jsonl")
    texts = [t for r in read_jsonl(tmp_path / "train.jsonl") for t in r["captions"].values()]
    assert all(is_caption(t) for t in texts) and len(texts) == 2 * len(PERSP)
