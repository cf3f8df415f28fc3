"""Removes credentials from text before it is shown, logged or written.

Servers and proxies sometimes echo the request (headers included) in an error body, and
HTTP libraries quote a bad header value in their exceptions; the captioning backends pass
every error text through :func:`redact` before it leaves them, so that ``failures.jsonl``,
log lines, progress output and the messages of the command line never hold the API key.
"""
from __future__ import annotations

import re
from typing import Iterable

REDACTED = "[REDACTED]"
# Shorter values are placeholders ("EMPTY", "ollama"), not secrets; replacing every
# occurrence would mangle messages. They are still redacted where they are header values.
MIN_SECRET_LEN = 8

# A credential header or parameter and its value, in HTTP, JSON (also escaped inside a JSON
# string), Python-repr and query-string forms: ``Authorization: Bearer x``,
# ``"api-key": "x"``, ``\"x-api-key\": \"x\"``, ``?api_key=x``.
_FIELD = re.compile(
    r"""(?ix)
    (\b(?:proxy-)?authorization|\b(?:x-)?(?:goog-)?api[-_]?key|\baccess[-_]?token)
    ((?:\\?["'])?\s*[:=]\s*(?:\\?["'])?)
    (?!(?:(?:bearer|basic|token)\s+)?\[REDACTED\])  # already redacted: leave it (idempotent)
    ((?:bearer|basic|token)\s+)?
    [^\s"'\\,;&}\]]+
    """
)
# A bearer token anywhere else (h11's "Illegal header value b'Bearer x'", logs).
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
# The password of a URL (https://user:password@host/...).
_URL_PASSWORD = re.compile(r"(://[^\s/:@]*:)(?!\[REDACTED\]@)[^\s/@]+@")


def redact(text: str, secrets: Iterable[str] = (), *, patterns: bool = True) -> str:
    """``text`` with each secret value (8+ characters) and, unless ``patterns`` is false,
    every credential header / parameter value, bearer token and URL password replaced by ``[REDACTED]``."""
    for s in secrets:
        if s and len(s) >= MIN_SECRET_LEN:
            text = text.replace(s, REDACTED)
    if patterns:
        text = _FIELD.sub(lambda m: f"{m[1]}{m[2]}{m[3] or ''}{REDACTED}", text)
        text = _BEARER.sub(lambda m: f"{m[1]}{REDACTED}", text)
        text = _URL_PASSWORD.sub(lambda m: f"{m[1]}{REDACTED}@", text)
    return text
