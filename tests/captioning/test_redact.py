"""The API key never reaches a file, a log line or the terminal: the redaction patterns, and a key
echoed by a server or cut by truncation."""
from pathlib import Path

import httpx
import pytest

from holiclip.captioning.backends import CaptionRequest, CaptionResult
from holiclip.captioning.backends.openai import OpenAIBackend
from holiclip.captioning.redact import REDACTED, redact

from tests.helpers.captioning import ENV, SECRET, caption_cli, files_text, make_images, read_jsonl
from tests.helpers.loopback import LoopbackServer


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
        res = caption_cli(srv.url, tmp_path / "imgs", out, SECRET, "--concurrency", "1", "--perspectives", "detail",
                   *extra)  # progress bar on (the default)
        assert srv.posts >= 2  # the key really was sent and echoed
    assert res.returncode == (3 if status == 500 else 1), res.stderr[-2000:]
    fails = read_jsonl(out / "failures.jsonl")
    assert fails and all(f"HTTP {status}" in f["error"] and REDACTED in f["error"] for f in fails)
    assert "authorization" in fails[0]["error"].lower()  # the echo is kept, the value is not
    everything = files_text(out) + res.stdout + res.stderr
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
