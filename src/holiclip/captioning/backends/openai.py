"""Backend for any OpenAI-compatible chat-completions server with image input.

Works with vLLM, Ollama, llama.cpp server, LM Studio and hosted APIs: the image goes as a
base64 ``data:`` URL in an ``image_url`` content part, next to the prompt text.

Robustness: one shared ``httpx.AsyncClient`` (connection pool sized to the concurrency),
per-request timeouts, retries with exponential back-off and jitter on 429 / 408 / 5xx and on
connection errors and timeouts, honouring ``Retry-After``.

The API key is read from an environment variable (name configurable) and only placed in the
Authorization header. Every error text leaving the backend (and every caption) goes through
:func:`~holiclip.captioning.redact.redact`, since servers may echo the request headers in an
error body. A 401/403 answer stops the run (:class:`CaptionFatalError`): until the server has
answered once, requests go one at a time, so a refused key costs one request; later, at most
the requests already in flight.
"""
from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import os
import random
import re
import time
from typing import Sequence

import httpx

from ..redact import redact
from .base import CaptionError, CaptionFatalError, CaptionRequest, CaptionResult

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
AUTH_STATUS = frozenset({401, 403})  # the key is refused: every other request would be too
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # vLLM's default; override with --base-url
MAX_RETRY_AFTER_S = 300.0  # a server asking for longer is treated as this


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds, fractional accepted, or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Exponential back-off with "equal jitter"; never shorter than the server's Retry-After."""
    rng = rng or random
    d = min(cap, base * (2 ** attempt))
    d = d / 2 + rng.uniform(0, d / 2)  # jitter so that N clients do not retry in lock-step
    if retry_after is not None:
        d = max(d, min(retry_after, MAX_RETRY_AFTER_S))
    return d


def _check_header_value(key: str, var: str) -> None:
    """Refuses a key that cannot go in a header: HTTP libraries quote such a value in their errors."""
    for i, ch in enumerate(key):
        if ch in "\r\n":
            why = "a line break"
        elif not (" " <= ch <= "~"):
            why = "a control or non-ASCII character"
        else:
            continue
        raise ValueError(f"${var} holds {why} at position {i + 1} of the API key; "
                         "an HTTP header cannot carry it (check how the variable is set)")


def _shrink(data: bytes, max_side: int) -> tuple[bytes, str]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if max(im.size) <= max_side:
            return data, ""
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "image/jpeg"


class OpenAIBackend:
    needs_image_bytes = True

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        batch_size: int = 1,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        temperature: float = 0.0,
        max_image_side: int | None = None,
        extra_body: dict | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.concurrency = max(1, int(concurrency))
        self.batch_size = max(1, int(batch_size))
        self.max_retries = max(0, int(max_retries))
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.temperature = temperature
        self.max_image_side = max_image_side
        self.extra_body = dict(extra_body or {})
        self.retries = 0  # how many retries happened (progress bar / stats)
        self.api_key_env = api_key_env
        if api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            # Most likely the key itself was passed: never repeat the value.
            raise ValueError("--api-key-env takes the name of an environment variable (letters, digits "
                             "and _, e.g. OPENAI_API_KEY), not the key: export the key in that variable")
        headers = {"Content-Type": "application/json"}
        # Surrounding whitespace is never part of a key (a CRLF .env file leaves a "\r").
        key = (os.environ.get(api_key_env) or "").strip() if api_key_env else ""
        if key:
            _check_header_value(key, api_key_env)
            headers["Authorization"] = f"Bearer {key}"
        self._secrets = (key,) if key else ()
        self._fatal: str | None = None  # set by the first 401/403; no request is sent after it
        self._gate = 0  # 0: nothing sent yet, 1: the first request is out, 2: the server has answered
        self._answered = asyncio.Event()
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
            transport=transport,
        )
        self._url = f"{self.base_url}/chat/completions"

    def __repr__(self) -> str:  # no headers in reprs: they hold the key
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def generate(self, batch: Sequence[CaptionRequest]) -> list:
        results = await asyncio.gather(*(self._one(r) for r in batch), return_exceptions=True)
        return [self._scrub(r) for r in results]

    def _scrub(self, res):
        """The one exit of the backend: no result or error text carries the key."""
        if isinstance(res, CaptionResult):
            return CaptionResult(redact(res.text, self._secrets, patterns=False), res.finish_reason)
        if isinstance(res, CaptionError):
            return type(res)(redact(str(res), self._secrets))
        if isinstance(res, Exception):  # unexpected: keep the type's name, drop the object
            return CaptionError(redact(f"{type(res).__name__}: {res}", self._secrets))
        return res

    def _body(self, resp: httpx.Response, limit: int) -> str:
        # Redact before cutting: a key cut in two would no longer be recognised.
        return repr(redact(resp.text, self._secrets)[:limit])

    async def _post(self, body: dict) -> httpx.Response:
        """One attempt. The first request goes alone: the others wait for the server's first
        answer, so that a refused key is found with one request, not ``concurrency``."""
        probe = self._gate == 0
        if probe:
            self._gate = 1
        elif self._gate == 1:
            await self._answered.wait()
        if self._fatal is not None:
            raise CaptionFatalError(self._fatal)
        try:
            resp = await self._client.post(self._url, json=body)
            if resp.status_code in AUTH_STATUS:
                if self._fatal is None:
                    self._fatal = self._auth_message(resp)
                raise CaptionFatalError(self._fatal)
            return resp
        finally:
            if probe:  # answered, refused, failed or cancelled: let the others go
                self._gate = 2
                self._answered.set()

    def _auth_message(self, resp: httpx.Response) -> str:
        var = self.api_key_env
        if self._secrets:
            what = f"the API key from ${var}; set ${var} to a valid key (or --api-key-env NAME for another variable)"
        elif var:
            what = (f"the request without an API key (${var} is not set); set ${var} to the key "
                    "(or --api-key-env NAME for another variable)")
        else:
            what = "the request without an API key; name the variable holding it with --api-key-env NAME"
        return f"{self._url}: HTTP {resp.status_code} {self._body(resp, 300)}: the server refused {what}"

    async def _payload(self, req: CaptionRequest) -> dict:
        data, mime = req.data, req.mime
        if self.max_image_side:
            small, small_mime = await asyncio.to_thread(_shrink, data, self.max_image_side)
            data, mime = small, small_mime or mime
        url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        body = {
            "model": self.model,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": req.prompt},
                ],
            }],
            "max_tokens": req.max_new_tokens,
            "temperature": self.temperature,
        }
        body.update(self.extra_body)
        return body

    async def _one(self, req: CaptionRequest) -> CaptionResult:
        body = await self._payload(req)
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = await self._post(body)
            except httpx.TransportError as err:  # connect/read errors and timeouts
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if resp.status_code == 200:
                    return self._parse(resp)
                last = f"HTTP {resp.status_code}: {self._body(resp, 300)}"
                if resp.status_code not in RETRY_STATUS and resp.status_code < 500:
                    raise CaptionError(f"{self._url}: {last} (not retried)")
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
            if attempt == self.max_retries:
                break
            self.retries += 1
            await asyncio.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_max, retry_after))
        raise CaptionError(f"{self._url}: gave up after {self.max_retries + 1} attempts; last error: {last}")

    def _parse(self, resp: httpx.Response) -> CaptionResult:
        try:
            choice = resp.json()["choices"][0]
            content = choice["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise CaptionError(f"{self._url}: unexpected response {self._body(resp, 200)} ({err!r})") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return CaptionResult(text=(content or "").strip(), finish_reason=choice.get("finish_reason"))
