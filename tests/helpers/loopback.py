"""A small chat-completions server on 127.0.0.1, for the captioning tests, benchmarks and dry runs.

It speaks just enough of the OpenAI protocol for ``holiclip caption run --backend openai``: it
decodes the base64 image of each request and answers ``"<sha256(image)[:12]> <prompt>"``,
so a caller can check that every row pairs the right image with the right prompt. It can
add a fixed latency to every request and inject faults on a request's *first* attempt
(429 with Retry-After, 500, a reply slower than the client's timeout, or a refusal), chosen
deterministically from the (image, prompt) pair. With ``echo_status`` it instead answers
every request with that status and a body that echoes the request's headers and body, as
some proxies and debug servers do (to check that a client never writes what it sent, its
API key included).

Safety: binds 127.0.0.1 only, answers at most ``max_requests`` requests and shuts itself
down after ``lifetime_s`` seconds, so a forgotten server cannot linger.

    python tests/helpers/loopback.py --latency 0.05   # prints "PORT <n>", serves
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def expected_text(image: bytes, prompt: str) -> str:
    """The answer the server gives for an image and a prompt (before any truncation)."""
    return f"{hashlib.sha256(image).hexdigest()[:12]} {prompt}"


@dataclass
class Faults:
    """Share of (image, prompt) pairs whose first attempt gets each fault."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_slow: float = 0.0
    rate_refuse: float = 0.0  # a 200 answer whose text is a refusal
    slow_s: float = 2.0
    retry_after: str = "0"

    def pick(self, key: str) -> str:
        u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        if u < self.rate_429:
            return "429"
        if u < self.rate_429 + self.rate_500:
            return "500"
        if u < self.rate_429 + self.rate_500 + self.rate_slow:
            return "slow"
        if u < self.rate_429 + self.rate_500 + self.rate_slow + self.rate_refuse:
            return "refuse"
        return "ok"


@dataclass
class Seen:
    prompt: str
    image_sha: str
    outcome: str  # "ok", "429", "500", "slow", "refuse"
    t: float


@dataclass
class ChatRequest:
    prompt: str
    image: bytes
    max_tokens: int
    model: str | None


def parse_chat_request(raw: bytes) -> ChatRequest:
    """The prompt and image of the last message; raises on anything else (answered 400)."""
    req = json.loads(raw)
    parts = req["messages"][-1]["content"]
    prompt = next(p["text"] for p in parts if p.get("type") == "text")
    url = next(p["image_url"]["url"] for p in parts if p.get("type") == "image_url")
    header, b64 = url.split(",", 1)
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise ValueError(f"not a base64 image data URL: {header[:40]!r}")
    image = base64.b64decode(b64, validate=True)
    return ChatRequest(prompt, image, int(req.get("max_tokens") or 1_000_000), req.get("model"))


REFUSAL = "I'm sorry, but I can't help with describing this image."


def completion(n: int, req: ChatRequest, refuse: bool = False) -> dict:
    """The chat-completion body for a request; more words than max_tokens are cut ("length")."""
    words = (REFUSAL if refuse else expected_text(req.image, req.prompt)).split(" ")
    finish = "stop"
    if len(words) > req.max_tokens:  # crude stand-in for a token limit
        words, finish = words[:req.max_tokens], "length"
    return {"id": f"cmpl-{n}", "object": "chat.completion", "model": req.model,
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": " ".join(words)}}]}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    # Headers and body go out in two writes; with Nagle on, the second waits for the
    # client's delayed ACK (~40 ms), which would swamp the latency being measured.
    disable_nagle_algorithm = True

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): normal for "slow" faults

    def do_POST(self):
        owner: LoopbackServer = self.server.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        owner.count_post()
        if owner.echo_status is not None:
            return self._send(owner.echo_status, {
                "error": "echo", "headers": dict(self.headers.items()),
                "path": self.path, "body": raw.decode("utf-8", "replace")})
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if not owner.authorised(self.headers.get("Authorization")):
            return self._send(401, {"error": {"message": "bad api key"}})
        try:
            req = parse_chat_request(raw)
        except Exception as err:
            return self._send(400, {"error": {"message": f"bad request: {err!r}"}})
        n, outcome = owner.record(req)
        if outcome == "over":
            threading.Thread(target=owner.stop, daemon=True).start()
            return self._send(503, {"error": {"message": "request budget spent"}})
        if owner.latency_s:
            time.sleep(owner.latency_s)
        if outcome == "429":
            return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": owner.faults.retry_after})
        if outcome == "500":
            return self._send(500, {"error": {"message": "injected failure"}})
        if outcome == "slow":
            time.sleep(owner.faults.slow_s)
        self._send(200, completion(n, req, refuse=outcome == "refuse"))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog (5) drops bursts of connections
    owner: "LoopbackServer"


class LoopbackServer:
    """Runs in a daemon thread; use as a context manager. ``url`` is the base URL (…/v1)."""

    def __init__(self, *, latency_s: float = 0.0, faults: Faults | None = None,
                 api_key: str | None = None, max_requests: int = 100_000, lifetime_s: float = 120.0,
                 port: int = 0, echo_status: int | None = None):
        self.latency_s, self.faults, self.api_key = latency_s, faults or Faults(), api_key
        self.max_requests, self.lifetime_s = max_requests, lifetime_s
        self.echo_status = echo_status
        self.seen: list[Seen] = []
        self.posts = 0  # every POST received, whatever the answer
        self.auth_failures = 0
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd = _HTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    # -- request accounting (called from the handler threads) ------------------------------
    def count_post(self) -> None:
        with self._lock:
            self.posts += 1

    def authorised(self, header: str | None) -> bool:
        if not self.api_key or header == f"Bearer {self.api_key}":
            return True
        with self._lock:
            self.auth_failures += 1
        return False

    def record(self, req: ChatRequest) -> tuple[int, str]:
        """(request number, outcome): a fault on a pair's first attempt only; "over" past the budget."""
        sha = hashlib.sha256(req.image).hexdigest()[:12]
        key = f"{sha}|{req.prompt}"
        with self._lock:
            n = len(self.seen)
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            outcome = self.faults.pick(key) if attempt == 0 else "ok"
            if n >= self.max_requests:
                outcome = "over"
            self.seen.append(Seen(req.prompt, sha, outcome, time.monotonic()))
        return n, outcome

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> "LoopbackServer":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def ok_requests(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.outcome == "ok"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    ap.add_argument("--lifetime", type=float, default=600.0, help="shut down after this many seconds")
    ap.add_argument("--max-requests", type=int, default=1_000_000)
    args = ap.parse_args()
    srv = LoopbackServer(latency_s=args.latency, lifetime_s=args.lifetime,
                         max_requests=args.max_requests, port=args.port).start()
    print(f"PORT {srv.port}", flush=True)
    srv._thread.join()


if __name__ == "__main__":
    main()
