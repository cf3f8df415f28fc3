"""The README's "Train on CC3M-scale data" chain, command by command, on a few images:
img2dataset-style shards -> `caption run` (an OpenAI-compatible server on loopback) ->
`caption merge --web-captions SHARDS --shards` -> `train` streaming those shards."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import webdataset as wds
from typer.testing import CliRunner

from holiclip.cli.app import app
from holiclip.data.readers import read_webdataset
from tests.helpers.datasets import draw
from tests.helpers.loopback import LoopbackServer

N = 12


def img2dataset_shards(root: Path) -> dict[str, bytes]:
    """Shards laid out as img2dataset writes them: jpg + txt (the alt-text) + json (its metadata)."""
    root.mkdir(parents=True)
    images = {}
    for k in range(2):
        with wds.TarWriter(str(root / f"{k:05d}.tar")) as sink:
            for i in range(k * N // 2, (k + 1) * N // 2):
                buf = io.BytesIO()
                draw(i, 32).save(buf, format="JPEG", quality=95)
                key = f"{k:05d}{i:04d}"
                images[key] = buf.getvalue()
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": f"alt text {i}",
                            "json": json.dumps({"key": key, "caption": f"alt text {i}", "status": "success"}).encode()})
    return images


def test_readme_chain_from_img2dataset_shards_to_a_streamed_training_run(tmp_path):
    raw = tmp_path / "raw"
    images = img2dataset_shards(raw)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    with LoopbackServer(lifetime_s=200, max_requests=200) as srv:
        run = subprocess.run(
            [sys.executable, "-m", "holiclip.cli.app", "caption", "run", "--images", str(raw), "--backend", "openai",
             "--model", "fake-vlm", "--base-url", srv.url, "--perspectives", "detail,main",
             "--out", str(tmp_path / "captions" / "fake-vlm"), "--no-progress"],
            env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]

    merged = CliRunner().invoke(app, ["caption", "merge", str(tmp_path / "captions" / "fake-vlm"), "--web-captions",
                                      str(raw), "--shards", str(tmp_path / "shards"), "--shard-size", "5",
                                      "--workers", "2"])
    assert merged.exit_code == 0, merged.output
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == N and len(sizes) == 3
    samples = list(read_webdataset(str(tmp_path / "shards" / "shard-{000000..000002}.tar")))
    assert sorted(s.image for s in samples) == sorted(images.values())  # the images' own bytes, each once
    for s in samples:
        i = int(s.captions["web"].rsplit(" ", 1)[1])
        assert s.image == images[f"{i // (N // 2):05d}{i:04d}"]
        assert s.captions["detail"].split(" ")[0] == hashlib.sha256(s.image).hexdigest()[:12]  # its own VLM reply
        assert set(s.captions) == {"web", "detail", "main"}

    out = tmp_path / "run"
    trained = CliRunner().invoke(app, [
        "train", "configs/smoke.yaml", f"data.train={tmp_path / 'shards'}", "data.slots=[web,detail,main]",
        "optim.batch_size=4", "optim.steps=4", "optim.warmup_steps=1", "data.workers=2", "run.progress=false",
        "run.tensorboard=false", f"run.out={out}", f"run.cache_dir={tmp_path / 'cache'}", "--resume", "latest"])
    assert trained.exit_code == 0, trained.output
    assert (out / "model" / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps[-1] == 4
