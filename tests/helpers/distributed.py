"""Process-group set-up for the multi-process tests."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the rendezvous of a gloo group or of torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
