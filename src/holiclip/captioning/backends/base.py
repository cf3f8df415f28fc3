"""What every captioning backend speaks: requests in, one result or exception per request out
(the implementations import this module, the package's ``make_backend`` imports them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union


@dataclass
class CaptionRequest:
    image: str  # the image key (see sources)
    data: bytes  # encoded image file (empty when the backend says needs_image_bytes = False)
    mime: str
    perspective: str
    prompt: str
    max_new_tokens: int


@dataclass
class CaptionResult:
    text: str
    finish_reason: str | None  # "stop", "length" (hit max tokens), or what the server said


class CaptionError(RuntimeError):
    """A request that failed for good (after retries, or not retryable)."""


class CaptionFatalError(CaptionError):
    """A failure every other request would hit too (the server refused the API key).

    The runner stops at the first one instead of sending the remaining requests; nothing is
    recorded for the requests, so re-running the same command does them."""


class Backend(Protocol):
    model: str  # recorded in every row; part of the resume key
    batch_size: int
    concurrency: int
    needs_image_bytes: bool

    async def generate(self, batch: Sequence[CaptionRequest]) -> list[Union[CaptionResult, BaseException]]:
        ...

    async def aclose(self) -> None:
        ...
