"""The API key never reaches a file, a log line or the terminal; a refused key stops the run at once."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from holiclip.captioning.backends import CaptionRequest, CaptionResult
from holiclip.captioning.backends.openai import OpenAIBackend
from holiclip.captioning.perspectives import resolve_perspectives
from holiclip.captioning.pipeline import RunAborted, run_captioning
from holiclip.captioning.redact import REDACTED, redact
from holiclip.captioning.sources import ImageSource

from tests.helpers.captioning import make_images, read_jsonl
from tests.helpers.loopback import LoopbackServer

SECRET = "sk-test-" + "Zq9s3cr3tK3y" * 3
ENV = "HOLI_CAPTION_TEST_KEY"


def _env(key: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", ENV)}
    if key is not None:
        env[ENV] = key
    return env


def _cli(url: str, imgs: Path, out: Path, key: str | None, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "holiclip.cli.caption", "run", "--images", str(imgs), "--backend", "openai",
           "--model", "fake-vlm", "--base-url", url, "--api-key-env", ENV, "--out", str(out), *extra]
    return subprocess.run(cmd, env=_env(key), capture_output=True, text=True, timeout=240)


def _files_text(folder: Path) -> str:
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in folder.rglob("*") if p.is_file())


def test_redact_forms():
    k = SECRET
    cases = [
        f"Authorization: Bearer {k}",  # HTTP header
        f'{{"Authorization": "Bearer {k}", "x": 1}}',  # JSON
        f"{{'authorization': 'Bearer {k}'}}",  # Python repr
        f'{{\\"api-key\\": \\"{k}\\"}}',  # JSON inside a JSON string
        f"x-api-key: {k}",
        f"https://host/v1?api_key={k}&model=m",
        f"Illegal header value b'Bearer {k}\\r'",  # h11's message for a bad header
        f"the token was {k}.",  # the bare value, anywhere
        f"https://user:{k}@host/v1/chat/completions: HTTP 500",  # a password in --base-url
    ]
    for text in cases:
        red = redact(text, [k])
        assert k not in red and k[:12] not in red and REDACTED in red, (text, red)
        assert redact(red, [k]) == red  # applying it twice changes nothing
    assert redact(cases[1], [k]) == f'{{"Authorization": "Bearer {REDACTED}", "x": 1}}'
    assert redact(cases[1], []) == redact(cases[1], [k])  # the pattern alone finds it too
    # nothing else is touched; an 8+ character key is replaced anywhere, short placeholders only as header values
    assert redact("HTTP 500: 'model not found'", [k]) == "HTTP 500: 'model not found'"
    assert redact("an EMPTY reply", ["EMPTY"]) == "an EMPTY reply"
    assert "EMPTY" not in redact('"authorization": "Bearer EMPTY"', ["EMPTY"])
    assert redact(f"caption {k} here", [k], patterns=False) == f"caption {REDACTED} here"


@pytest.mark.parametrize("status", [500, 400])
def test_key_echoed_in_error_bodies_is_redacted_everywhere(tmp_path: Path, status: int):
    make_images(tmp_path / "imgs", 3)
    out = tmp_path / "out"
    # 500 is retried and the run is stopped by the circuit breaker (its message quotes the last error);
    # 400 is not retried and the run ends with "requests failed" and the stats line.
    extra = ["--max-retries", "1", "--max-consecutive-failures", "2"] if status == 500 else ["--max-retries", "0"]
    with LoopbackServer(echo_status=status, lifetime_s=120) as srv:
        res = _cli(srv.url, tmp_path / "imgs", out, SECRET, "--concurrency", "1", "--perspectives", "detail",
                   "--progress", *extra)
        assert srv.posts >= 2  # the key really was sent and echoed
    assert res.returncode == (3 if status == 500 else 1), res.stderr[-2000:]
    fails = read_jsonl(out / "failures.jsonl")
    assert fails and all(f"HTTP {status}" in f["error"] and REDACTED in f["error"] for f in fails)
    assert "authorization" in fails[0]["error"].lower()  # the echo is kept, the value is not
    everything = _files_text(out) + res.stdout + res.stderr
    assert SECRET not in everything and SECRET[:12] not in everything
    assert "Traceback" not in res.stderr
    if status == 500:  # the stop message quotes the last error
        assert "last: " in res.stderr and REDACTED in res.stderr


def test_key_cut_by_truncation_and_key_in_caption_text(tmp_path: Path, monkeypatch):
    # The error body is cut to 300 characters; the key straddles the cut, so redacting after the
    # cut would leave its first half. A server that puts the key into a caption gets it redacted too.
    monkeypatch.setenv(ENV, SECRET)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {SECRET}"
        if b"fail" in request.content:
            return httpx.Response(422, text="x" * 290 + SECRET + "y" * 50)
        return httpx.Response(200, json={"choices": [{"message": {"content": f"a cat {SECRET}"}, "finish_reason": "stop"}]})

    be = OpenAIBackend("m", base_url="http://vlm/v1", api_key_env=ENV, transport=httpx.MockTransport(handler))
    reqs = [CaptionRequest("a", b"", "image/png", "detail", p, 10) for p in ("fail", "ok")]
    import asyncio

    async def go():
        try:
            return await be.generate(reqs)
        finally:
            await be.aclose()

    err, ok = asyncio.run(go())
    assert isinstance(ok, CaptionResult) and ok.text == f"a cat {REDACTED}"
    assert "HTTP 422" in str(err) and SECRET[:6] not in str(err) and REDACTED in str(err)


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
        bad = _cli(srv.url, imgs, out, SECRET + "-revoked", *persp)
        bad_posts = srv.posts - n0
        # One request, not 12: until the server has answered once, requests go one at a time.
        assert bad_posts == 1 and srv.auth_failures == 1
        assert bad.returncode == 3 and "Traceback" not in bad.stderr
        assert "HTTP 401" in bad.stderr and f"${ENV}" in bad.stderr and "re-run the same command" in bad.stderr
        assert SECRET not in bad.stderr + bad.stdout + _files_text(out)
        assert (out / "captions.jsonl").read_bytes() == before  # nothing lost, nothing half-done recorded
        assert not (out / "failures.jsonl").exists()  # not the images' fault: no failure rows to retry
        # unset variable: the message says no key was sent and which variable to set
        nokey = _cli(srv.url, imgs, out, None, *persp)
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
