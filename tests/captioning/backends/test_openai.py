"""The openai backend + runner against a real HTTP server on 127.0.0.1 that injects faults; a refused
key stops the run at once."""
import email.utils
import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from holiclip.captioning.backends.openai import OpenAIBackend, backoff_delay, parse_retry_after
from holiclip.captioning.perspectives import PAPER_PERSPECTIVES, resolve_perspectives
from holiclip.captioning.pipeline import RunAborted, run_captioning
from holiclip.captioning.redact import REDACTED
from holiclip.captioning.sources import ImageSource

from tests.helpers.captioning import ENV, SECRET, caption_cli, files_text, make_images, read_jsonl
from tests.helpers.loopback import Faults, LoopbackServer, expected_text

PERSP = "detail,background,main"


def _run(srv, imgs_dir, out, **kw):
    opts = dict(base_url=srv.url, concurrency=8, timeout=0.4, backoff_base=0.01, backoff_max=0.05)
    run_kw = {k: kw.pop(k) for k in ("max_new_tokens", "max_consecutive_failures") if k in kw}
    opts.update(kw)
    be = OpenAIBackend("fake-vlm", **opts)
    return run_captioning(ImageSource(imgs_dir), resolve_perspectives(PERSP), be, out, progress=False, **run_kw)


def test_all_rows_once_with_faults_and_registry_prompts(tmp_path: Path):
    imgs = make_images(tmp_path / "imgs", 12)
    faults = Faults(rate_429=0.2, rate_500=0.2, rate_slow=0.1, slow_s=1.0)
    with LoopbackServer(faults=faults, max_requests=500, lifetime_s=60) as srv:
        st = _run(srv, tmp_path / "imgs", tmp_path / "out")
        seen = list(srv.seen)
    rows = read_jsonl(tmp_path / "out" / "captions.jsonl")
    keys = Counter((r["image"], r["perspective"], r["model"]) for r in rows)
    assert len(keys) == 12 * 3 and set(keys.values()) == {1}  # every row, exactly once
    for r in rows:  # the server's answer for *this* image and *this* registry prompt
        assert r["prompt"] == PAPER_PERSPECTIVES[r["perspective"]].prompt
        assert r["text"] == expected_text(Path(r["image"]).read_bytes(), r["prompt"])
        assert r["finish_reason"] == "stop" and set(r) == {"image", "perspective", "model", "prompt", "text", "finish_reason"}
    assert {s.prompt for s in seen} == {PAPER_PERSPECTIVES[p].prompt for p in PERSP.split(",")}
    outcomes = Counter(s.outcome for s in seen)
    assert outcomes["429"] and outcomes["500"] and outcomes["slow"]  # faults were injected...
    assert st.retries >= outcomes["429"] + outcomes["500"] + outcomes["slow"]  # ...and each retried
    assert st.failures == 0 and st.rows_written == 36 and not (tmp_path / "out" / "failures.jsonl").exists()
    assert len(imgs) == 12

    # Re-running the same command skips everything that is done.
    with LoopbackServer(lifetime_s=30) as srv2:
        st2 = _run(srv2, tmp_path / "imgs", tmp_path / "out")
        assert srv2.seen == []
    assert st2.images_skipped == 12 and st2.rows_written == 0
    assert len(read_jsonl(tmp_path / "out" / "captions.jsonl")) == 36


def test_resume_after_failures_and_duplicate_listing(tmp_path: Path):
    make_images(tmp_path / "imgs", 6)
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(f"imgs/img{i:03d}.png" for i in (0, 1, 2, 3, 4, 5, 1, 1)) + "\n")
    # every first attempt fails with 500, and no retries are allowed: all fail, then a re-run fixes it
    with LoopbackServer(faults=Faults(rate_500=1.0), lifetime_s=30) as srv:
        be = OpenAIBackend("fake-vlm", base_url=srv.url, concurrency=4, max_retries=0, timeout=2)
        st = run_captioning(ImageSource(lst), resolve_perspectives("detail"), be, tmp_path / "out", progress=False)
    assert st.failures == 6 and st.rows_written == 0 and st.images == 8
    fails = read_jsonl(tmp_path / "out" / "failures.jsonl")
    assert len(fails) == 6 and "HTTP 500" in fails[0]["error"]
    with LoopbackServer(lifetime_s=30) as srv:
        be = OpenAIBackend("fake-vlm", base_url=srv.url, concurrency=4, max_retries=0, timeout=2)
        st = run_captioning(ImageSource(lst), resolve_perspectives("detail"), be, tmp_path / "out", progress=False)
        assert len(srv.seen) == 6  # img001 listed three times is still asked once
    assert st.failures == 0 and len(read_jsonl(tmp_path / "out" / "captions.jsonl")) == 6


def test_retry_after_is_honoured(tmp_path: Path):
    make_images(tmp_path / "imgs", 2)
    with LoopbackServer(faults=Faults(rate_429=1.0, retry_after="1"), lifetime_s=30) as srv:
        be = OpenAIBackend("fake-vlm", base_url=srv.url, concurrency=2, backoff_base=0.001, timeout=5)
        run_captioning(ImageSource(tmp_path / "imgs"), resolve_perspectives("detail"), be, tmp_path / "out", progress=False)
        seen = list(srv.seen)
    assert Counter(s.outcome for s in seen) == {"429": 2, "ok": 2}
    for sha in {s.image_sha for s in seen}:
        t = [s.t for s in seen if s.image_sha == sha]
        assert t[1] - t[0] >= 0.95  # waited for Retry-After: 1, not the 1 ms back-off


def test_backoff_and_retry_after_parsing():
    rng = random.Random(0)
    delays = [backoff_delay(a, 0.5, 8.0, rng=rng) for a in range(8)]
    assert all(0.25 <= d <= 8.0 for d in delays) and delays[-1] >= 4.0
    assert backoff_delay(0, 0.5, 8.0, retry_after=3.0) == 3.0
    assert backoff_delay(0, 0.5, 8.0, retry_after=10_000) == 300.0  # capped
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5 and parse_retry_after("x") is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(when) <= 31


def test_api_key_is_sent_but_never_written(tmp_path: Path, monkeypatch, caplog):
    make_images(tmp_path / "imgs", 2)
    secret = "sk-test-" + "s3cr3t" * 4
    monkeypatch.setenv("HOLI_TEST_KEY", secret)
    with LoopbackServer(api_key=secret, lifetime_s=30) as srv:
        be = OpenAIBackend("fake-vlm", base_url=srv.url, api_key_env="HOLI_TEST_KEY")
        assert secret not in repr(be)
        st = run_captioning(ImageSource(tmp_path / "imgs"), resolve_perspectives("detail"), be, tmp_path / "ok", progress=False)
        assert st.rows_written == 2 and srv.auth_failures == 0
        # a wrong key: 401 is not retried, stops the run at once, and the error text holds no key
        monkeypatch.setenv("HOLI_TEST_KEY", secret + "-wrong")
        be = OpenAIBackend("fake-vlm", base_url=srv.url, api_key_env="HOLI_TEST_KEY", backoff_base=0.01)
        with pytest.raises(RunAborted, match="HTTP 401") as info:
            run_captioning(ImageSource(tmp_path / "imgs"), resolve_perspectives("detail"), be, tmp_path / "bad", progress=False)
        assert be.retries == 0 and srv.auth_failures == 1
    written = "".join(p.read_text() for d in ("ok", "bad") for p in (tmp_path / d).iterdir())
    assert secret not in written + str(info.value) and secret not in caplog.text


def test_truncation_reported_and_circuit_breaker(tmp_path: Path):
    make_images(tmp_path / "imgs", 3)
    with LoopbackServer(lifetime_s=30) as srv:
        st = _run(srv, tmp_path / "imgs", tmp_path / "short", max_new_tokens=3)
    rows = read_jsonl(tmp_path / "short" / "captions.jsonl")
    assert st.rows_written == 9 and {r["finish_reason"] for r in rows} == {"length"}
    assert all(len(r["text"].split()) == 3 for r in rows)
    # nothing listens on this port: connection errors, then the run stops by itself
    with LoopbackServer(lifetime_s=5) as dead:
        url = dead.url
    be = OpenAIBackend("fake-vlm", base_url=url, concurrency=2, max_retries=1, backoff_base=0.001, timeout=1)
    with pytest.raises(RunAborted, match="[34] failures in a row"):  # 4: both workers failed at once
        run_captioning(ImageSource(tmp_path / "imgs"), resolve_perspectives("detail,main"), be, tmp_path / "dead",
                       progress=False, max_consecutive_failures=3)
    assert "ConnectError" in read_jsonl(tmp_path / "dead" / "failures.jsonl")[0]["error"]


# -- a refused key -----------------------------------------------------------------------------------
def test_key_with_line_break_is_refused_without_showing_it(tmp_path: Path, monkeypatch):
    make_images(tmp_path / "imgs", 1)
    # trailing whitespace (a CRLF .env file) is dropped and the key works
    monkeypatch.setenv(ENV, SECRET + "\r\n")
    with LoopbackServer(api_key=SECRET, lifetime_s=30) as srv:
        be = OpenAIBackend("fake-vlm", base_url=srv.url, api_key_env=ENV)
        st = run_captioning(ImageSource(tmp_path / "imgs"), resolve_perspectives("detail"), be, tmp_path / "out",
                            progress=False)
    assert st.rows_written == 1 and srv.auth_failures == 0
    # a break inside the key cannot go in a header: a clear error that names the variable, not the value
    monkeypatch.setenv(ENV, SECRET[:10] + "\n" + SECRET[10:])
    with pytest.raises(ValueError, match=f"\\${ENV}.*line break") as info:
        OpenAIBackend("fake-vlm", base_url="http://127.0.0.1:9/v1", api_key_env=ENV)
    assert SECRET[:10] not in str(info.value)
    # the key given where the variable's name goes: refused, and not repeated
    with pytest.raises(ValueError, match="--api-key-env takes the name of an environment variable") as info:
        OpenAIBackend("fake-vlm", base_url="http://127.0.0.1:9/v1", api_key_env=SECRET)
    assert SECRET[:10] not in str(info.value)


def test_refused_key_stops_after_one_request_and_the_run_resumes(tmp_path: Path, monkeypatch):
    imgs = tmp_path / "imgs"
    make_images(imgs, 4)
    out = tmp_path / "out"
    persp = ("--perspectives", "detail,style", "--no-progress", "--concurrency", "8")
    monkeypatch.setenv(ENV, SECRET)

    def good_run():  # in-process; the runs under test are real commands
        be = OpenAIBackend("fake-vlm", base_url=srv.url, api_key_env=ENV, concurrency=8)
        return run_captioning(ImageSource(imgs), resolve_perspectives("detail,style"), be, out, progress=False)

    with LoopbackServer(api_key=SECRET, lifetime_s=200) as srv:
        assert good_run().rows_written == 8  # 4 images done
        before = (out / "captions.jsonl").read_bytes()
        make_images(imgs, 10)  # 6 new images arrive
        n0 = srv.posts
        bad = caption_cli(srv.url, imgs, out, SECRET + "-revoked", *persp)
        bad_posts = srv.posts - n0
        # One request, not 12: until the server has answered once, requests go one at a time.
        assert bad_posts == 1 and srv.auth_failures == 1
        assert bad.returncode == 3 and "Traceback" not in bad.stderr
        assert "HTTP 401" in bad.stderr and f"${ENV}" in bad.stderr and "re-run the same command" in bad.stderr
        assert SECRET not in bad.stderr + bad.stdout + files_text(out)
        assert (out / "captions.jsonl").read_bytes() == before  # nothing lost, nothing half-done recorded
        assert not (out / "failures.jsonl").exists()  # not the images' fault: no failure rows to retry
        # unset variable: the message says no key was sent and which variable to set
        nokey = caption_cli(srv.url, imgs, out, None, *persp)
        assert nokey.returncode == 3 and f"${ENV} is not set" in nokey.stderr and "Traceback" not in nokey.stderr
        n1 = srv.posts
        again = good_run()
        assert again.failures == 0 and srv.posts - n1 == 6 * 2  # only what was missing
    rows = read_jsonl(out / "captions.jsonl")
    assert len(rows) == 20 and set(Counter((r["image"], r["perspective"]) for r in rows).values()) == {1}


@pytest.mark.parametrize("status", [401, 403])
def test_401_403_echoing_the_request_stop_after_one_request(tmp_path: Path, monkeypatch, status: int):
    # 401 or 403 with an echo of the request: stops after one request, and the message shows no key.
    make_images(tmp_path / "imgs", 6)
    monkeypatch.setenv(ENV, SECRET)
    with LoopbackServer(echo_status=status, lifetime_s=30) as srv:
        be = OpenAIBackend("fake-vlm", base_url=srv.url, api_key_env=ENV, concurrency=8, backoff_base=0.001)
        with pytest.raises(RunAborted) as info:
            run_captioning(ImageSource(tmp_path / "imgs"), resolve_perspectives("detail,main"), be, tmp_path / "out",
                           progress=False)
        assert srv.posts == 1
    msg = str(info.value)
    assert f"HTTP {status}" in msg and f"${ENV}" in msg and SECRET not in msg and REDACTED in msg
    assert read_jsonl(tmp_path / "out" / "captions.jsonl") == [] and not (tmp_path / "out" / "failures.jsonl").exists()


def test_key_revoked_mid_run_sends_at_most_the_requests_in_flight(tmp_path: Path, monkeypatch):
    # After the first answer requests overlap, so a key that stops working mid-run costs at most
    # --concurrency refused requests (those already sent); none is sent after the first refusal.
    make_images(tmp_path / "imgs", 30)
    monkeypatch.setenv(ENV, SECRET)
    conc = 4
    with LoopbackServer(api_key=SECRET, latency_s=0.02, lifetime_s=60) as srv:
        be = OpenAIBackend("fake-vlm", base_url=srv.url, api_key_env=ENV, concurrency=conc)
        orig_post = be._client.post
        state = {"n": 0}

        async def post(*a, **kw):  # the key is revoked on the server after 10 requests
            state["n"] += 1
            if state["n"] == 11:
                srv.api_key = "rotated"
            return await orig_post(*a, **kw)

        be._client.post = post
        with pytest.raises(RunAborted, match="HTTP 401"):
            run_captioning(ImageSource(tmp_path / "imgs"), resolve_perspectives("detail"), be, tmp_path / "out",
                           progress=False)
        refused = srv.auth_failures
    assert 1 <= refused <= conc
    rows = read_jsonl(tmp_path / "out" / "captions.jsonl")
    # rows answered before the stop are kept (a 200 still in flight at the stop is asked again on resume)
    assert 10 - conc <= len(rows) <= srv.posts - refused
    assert len({r["image"] for r in rows}) == len(rows) and SECRET not in json.dumps(rows)
