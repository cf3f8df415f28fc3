"""Cache of a frozen text trunk's outputs, one row per unique text.

With a locked pretrained text tower only the projection trains, so each caption's trunk
output is computed once. The cache file belongs to the text trunk: its key is a digest of the
trunk's weights and of the tokenizer, so other text weights (``model.pretrained=``, a
fine-tuned trunk) or another tokenizer never meet old features. It grows: a run computes only
the texts it does not find, so runs on the same data with different slots (CLIP on ``web``,
O2M on all slots) share it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..io import atomic_path


def tokenizer_digest(tokenizer) -> str:
    """What decides the token ids: the full vocabulary/merges/normaliser and the context length."""
    h = hashlib.sha256(f"{type(tokenizer).__name__}|{getattr(tokenizer, 'context_length', '')}".encode())
    hf = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
    if hf is not None and hasattr(hf, "backend_tokenizer"):
        h.update(hf.backend_tokenizer.to_str().encode())
    elif hf is not None:
        h.update(json.dumps(sorted(hf.get_vocab().items())).encode())
    elif hasattr(tokenizer, "encoder"):  # open_clip's SimpleTokenizer
        h.update(json.dumps(sorted(tokenizer.encoder.items())).encode())
        h.update(json.dumps(sorted(f"{a} {b}={r}" for (a, b), r in tokenizer.bpe_ranks.items())).encode())
    else:
        raise TypeError(f"cannot fingerprint tokenizer {type(tokenizer).__name__} for the text cache")
    return h.hexdigest()


def trunk_digest(model) -> str:
    """Digest of the text trunk's weights (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.text_trunk_state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_path(cache_dir: str | Path, model, tokenizer) -> Path:
    key = hashlib.sha256(f"{trunk_digest(model)}|{tokenizer_digest(tokenizer)}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"text_trunk_{key}.safetensors"


def _read(path: Path) -> tuple[torch.Tensor | None, list[str]]:
    if not path.exists():
        return None, []
    with safe_open(str(path), framework="pt") as fh:
        texts = json.loads(fh.metadata()["texts"])
        return fh.get_tensor("features"), texts


@torch.no_grad()
def build_text_cache(model, tokenizer, texts: list[str], cache_dir: str | Path, device, batch_size: int = 256,
                     progress: bool = True) -> tuple[torch.Tensor, dict[str, int]]:
    """(N, W) trunk features covering ``texts`` and the text -> row mapping."""
    path = cache_path(cache_dir, model, tokenizer)
    features, known = _read(path)
    index = {t: i for i, t in enumerate(known)}
    missing = [t for t in dict.fromkeys(texts) if t not in index]
    if missing:
        # batches of similar length: padding is trimmed per batch, so sorting saves most compute
        lengths = (tokenizer(missing) != getattr(model.clip.text.config, "pad_token_id", 0)).sum(1).tolist()
        missing = [t for _, t in sorted(zip(lengths, missing), key=lambda p: p[0])]
        was_training = model.training
        model.eval()
        rows = []
        for start in tqdm(range(0, len(missing), batch_size), desc="caching text features", disable=not progress):
            tokens = tokenizer(missing[start: start + batch_size]).to(device)
            rows.append(model.text_trunk(tokens).float().cpu())
        model.train(was_training)
        new = torch.cat(rows)
        features = new if features is None else torch.cat([features, new])
        known = known + missing
        index = {t: i for i, t in enumerate(known)}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # concurrent runs write their own temp files; the last rename wins
            save_file({"features": features.contiguous()}, str(tmp), metadata={"texts": json.dumps(known)})
    return features, index
