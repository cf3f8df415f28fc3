"""Captioning test inputs and outputs: tiny images made on the spot, JSONL rows read back, the
`caption run` command with a test API key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image


def make_images(folder: Path, n: int, size: int = 12, ext: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.{ext}"
        Image.new("RGB", (size, size), (i * 37 % 256, i * 11 % 256, 200)).save(p)
        paths.append(p)
    return paths


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# a fake API key, and the environment variable the tests pass it in
SECRET = "sk-test-" + "Zq9s3cr3tK3y" * 3
ENV = "HOLI_CAPTION_TEST_KEY"


def env_with_key(key: str | None) -> dict:
    """This process's environment without any real OpenAI settings, with ``key`` in ``ENV`` (unset if None)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", ENV)}
    if key is not None:
        env[ENV] = key
    return env


def caption_cli(url: str, imgs: Path, out: Path, key: str | None, *extra: str) -> subprocess.CompletedProcess:
    """`holiclip caption run --backend openai` in a fresh interpreter, as a user runs it."""
    cmd = [sys.executable, "-m", "holiclip.cli.caption", "run", "--images", str(imgs), "--backend", "openai",
           "--model", "fake-vlm", "--base-url", url, "--api-key-env", ENV, "--out", str(out), *extra]
    return subprocess.run(cmd, env=env_with_key(key), capture_output=True, text=True, timeout=240)


def files_text(folder: Path) -> str:
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in folder.rglob("*") if p.is_file())
