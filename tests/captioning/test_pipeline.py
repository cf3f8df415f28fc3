"""A run killed with SIGKILL midway, then re-run, ends complete with no duplicate rows."""
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.helpers.captioning import make_images, read_jsonl
from tests.helpers.loopback import LoopbackServer, expected_text

N_IMAGES, PERSP = 40, ("detail", "style")


def _cmd(url: str, tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "holiclip.cli.caption", "run", "--images", str(tmp_path / "imgs"),
            "--backend", "openai", "--model", "fake-vlm", "--base-url", url, "--perspectives", ",".join(PERSP),
            "--out", str(tmp_path / "out"), "--concurrency", "2", "--no-progress"]


def test_sigkill_midway_then_rerun_is_complete_without_duplicates(tmp_path: Path):
    make_images(tmp_path / "imgs", N_IMAGES)
    out = tmp_path / "out" / "captions.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    total = N_IMAGES * len(PERSP)
    with LoopbackServer(latency_s=0.03, lifetime_s=90, max_requests=1000) as srv:
        proc = subprocess.Popen(_cmd(srv.url, tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240  # a loaded CI box can take a minute just to import torch
        lines_at_kill = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists():
                lines_at_kill = out.read_bytes().count(b"\n")
                if lines_at_kill >= 10:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()
        after_kill = read_jsonl(out)
        assert 10 <= len(after_kill) < total  # really killed midway

        rerun = subprocess.run(_cmd(srv.url, tmp_path), env=env, capture_output=True, text=True, timeout=240)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        requests_total = len(srv.seen)

    rows = read_jsonl(out)
    keys = Counter((r["image"], r["perspective"]) for r in rows)
    assert len(rows) == total and len(keys) == total  # complete, no duplicates
    assert rows[: len(after_kill)] == after_kill  # nothing rewritten
    for r in rows:
        assert r["text"] == expected_text(Path(r["image"]).read_bytes(), r["prompt"])
    # the re-run asked only for what was missing, plus at most the killed run's in-flight requests
    assert requests_total <= total + 2
    assert f"{total - len(after_kill)} rows written" in rerun.stderr
