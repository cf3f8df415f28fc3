"""Cache of a frozen text trunk's outputs, one row per unique text.

With a locked pretrained text tower only the projection trains, so each caption's trunk
output is computed once (and reused across runs with the same texts and tower).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm


def cache_key(model_name: str, texts: list[str], context_length: int) -> str:
    h = hashlib.sha256(f"{model_name}|{context_length}".encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


@torch.no_grad()
def build_text_cache(model, tokenizer, texts: list[str], cache_dir: str | Path, device, batch_size: int = 256,
                     progress: bool = True) -> tuple[torch.Tensor, dict[str, int]]:
    """(N_unique, W) trunk features and text -> row mapping; loads from disk when present."""
    key = cache_key(model.model_name, texts, model.context_length)
    path = Path(cache_dir) / f"text_trunk_{key}.safetensors"
    index = {t: i for i, t in enumerate(texts)}
    if path.exists():
        return load_file(str(path))["features"], index
    was_training = model.training
    model.eval()
    rows = []
    for start in tqdm(range(0, len(texts), batch_size), desc="caching text features", disable=not progress):
        tokens = tokenizer(texts[start: start + batch_size]).to(device)
        rows.append(model.text_trunk(tokens).float().cpu())
    model.train(was_training)
    features = torch.cat(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"features": features}, str(tmp), metadata={"texts": str(len(texts)), "model": json.dumps(model.model_name)})
    tmp.replace(path)
    return features, index
