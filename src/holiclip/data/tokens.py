"""Pre-tokenised shards: the captions' token ids written beside them, so training tokenises nothing.

``holiclip data shard --tokenizer MODEL`` and ``holiclip caption merge --shards DIR --tokenizer MODEL``
give each sample a ``tokens.npy`` member: the ids the tokenizer returns for the json's captions,
one row per slot in the json's ``captions`` order, (M, L) uint16 (uint32 for a vocabulary past
65,536), L the tokenizer's context length (truncated as it truncates). The json gets
``"tokens": {"tokenizer": {"name", "digest"}, "slots": [...], "lengths": [...]}``: the lengths
are the untruncated ones (start and end tokens included), so training counts truncated texts as
it does when it tokenises.

The stream hands a sample's stored rows for the run's slots (a ``fill:<slot>`` slot takes its
source's row) to :class:`holiclip.data.loader.Collate`, which stacks them instead of tokenising:
the same (B, M, L) tensor as tokenising. A shard written with another tokenizer (the digest of
its vocabulary, merges and context length differs) is refused, naming the shard and both
tokenizers; a batch where some sample has no stored ids is tokenised as usual.
"""
from __future__ import annotations

import hashlib
import io
import json
import weakref
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .records import DataError, has_text, parse_policy
from .webdataset import TOKENS_MEMBER

if TYPE_CHECKING:
    import torch

_IDENTITIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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
        raise TypeError(f"cannot fingerprint tokenizer {type(tokenizer).__name__} (text cache, pre-tokenised shards)")
    return h.hexdigest()


def tokenizer_identity(tokenizer) -> dict:
    """``{"name": readable, "digest": tokenizer_digest}``, computed once per tokenizer object."""
    try:
        return _IDENTITIES[tokenizer]
    except (KeyError, TypeError):
        pass
    hf = getattr(tokenizer, "tokenizer", None)
    name = type(tokenizer).__name__ + (f" {hf.name_or_path}" if getattr(hf, "name_or_path", None) else "")
    identity = {"name": f"{name} (context {getattr(tokenizer, 'context_length', '?')})",
                "digest": tokenizer_digest(tokenizer)}
    try:
        _IDENTITIES[tokenizer] = identity
    except TypeError:  # not weak-referenceable: computed each time
        pass
    return identity


def _shown(identity: dict) -> str:
    return f"{identity.get('name', '?')}, digest {str(identity.get('digest', '?'))[:12]}"


def _plain_clip_bpe(tokenizer) -> bool:
    """open_clip's SimpleTokenizer (or a subclass keeping its ``__call__``) without a reduction mask."""
    from open_clip.tokenizer import SimpleTokenizer

    return (isinstance(tokenizer, SimpleTokenizer) and type(tokenizer).__call__ is SimpleTokenizer.__call__
            and getattr(tokenizer, "reduction_fn", None) is None)


def tokenize(tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
    """``(tokenizer(texts), lengths)``: the (N, context) ids the tokenizer gives, and the tokens each
    text needs including start / end tokens, before truncation (over the context: truncated).

    For open_clip's CLIP BPE both come from one ``encode`` per text, with the rules of its
    ``__call__`` (start token, the ids, end token; cut to the context with the end token kept last;
    zero padding); other tokenizers are called as they are and counted by :func:`token_lengths`."""
    texts = list(texts)
    if not _plain_clip_bpe(tokenizer):
        return tokenizer(texts), token_lengths(tokenizer, texts)
    import torch

    ctx, sot, eot = tokenizer.context_length, tokenizer.sot_token_id, tokenizer.eot_token_id
    ids = np.zeros((len(texts), ctx), dtype=np.int64)
    lengths = []
    for i, text in enumerate(texts):
        tokens = [sot, *tokenizer.encode(text), eot]
        lengths.append(len(tokens))
        if len(tokens) > ctx:  # as SimpleTokenizer.__call__: cut, the end token kept last
            tokens = tokens[:ctx]
            tokens[-1] = eot
        ids[i, : len(tokens)] = tokens
    return torch.from_numpy(ids), lengths


def token_lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """Tokens each text needs including start/end tokens, before any truncation."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # open_clip SimpleTokenizer
        return [len(tokenizer.encode(t)) + 2 for t in texts]
    hf = getattr(tokenizer, "tokenizer", None)  # open_clip HFTokenizer wraps a transformers tokenizer
    if hf is not None:
        return [len(ids) for ids in hf(list(texts), truncation=False)["input_ids"]]
    # unknown tokenizer: a text that fills the whole context is taken as truncated
    tokens = tokenizer(list(texts))
    filled = (tokens != 0).sum(1)
    return [int(n) + (1 if n >= tokens.shape[1] else 0) for n in filled]


# -- writing ----------------------------------------------------------------------------------------------
def token_members(tokenizer, captions: dict[str, str]) -> tuple[bytes, dict]:
    """(``tokens.npy`` bytes, the json's ``tokens`` field) for a sample's captions."""
    slots, texts = list(captions), list(captions.values())
    ids, lengths = tokenize(tokenizer, texts)
    ids = ids.numpy()
    dtype = np.uint16 if ids.max(initial=0) < 2**16 else np.uint32
    buf = io.BytesIO()
    np.save(buf, ids.astype(dtype), allow_pickle=False)
    return buf.getvalue(), {"tokenizer": tokenizer_identity(tokenizer), "slots": slots,
                            "lengths": [int(n) for n in lengths]}


# -- reading ------------------------------------------------------------------------------------------------
def stored_tokens(raw: dict, row: dict, captions: dict, slots: Sequence[str], policy: str, place: str) -> dict | None:
    """The stored ids of the run's ``slots`` for one sample (``{"ids": (M, L) array, "lengths",
    "tokenizer", "where"}``), None when it has none or lacks one of the slots (then tokenised as
    usual); a :class:`DataError` naming ``place`` when the member and the json disagree."""
    meta = row.get("tokens")
    if meta is None or TOKENS_MEMBER not in raw:
        return None
    try:
        ids = np.load(io.BytesIO(raw[TOKENS_MEMBER]), allow_pickle=False)
        stored, lengths = list(meta["slots"]), list(meta["lengths"])
        identity = dict(meta["tokenizer"])
    except (ValueError, OSError, EOFError, KeyError, TypeError) as err:
        raise DataError(f"{place}: unreadable {TOKENS_MEMBER} member or json 'tokens' field ({err})") from None
    if ids.ndim != 2 or ids.dtype not in (np.uint16, np.uint32) or not len(ids) == len(stored) == len(lengths):
        raise DataError(f"{place}: {TOKENS_MEMBER} holds {ids.dtype} {ids.shape}, the json 'tokens' names "
                        f"{len(stored)} slots and {len(lengths)} lengths")
    _, fill = parse_policy(policy)
    rows = []
    for slot in slots:
        source = slot if has_text(captions.get(slot)) else fill  # as apply_missing_slot_policy fills it
        if source not in stored:
            return None
        rows.append(stored.index(source))
    return {"ids": ids[rows], "lengths": [lengths[r] for r in rows], "tokenizer": identity, "where": place}


def stack_tokens(items: Sequence[dict], tokenizer, context_length: int) -> tuple[torch.Tensor, int] | None:
    """(B, M, L) token ids and the truncated count from the items' stored ids, None unless every
    item has them; a :class:`DataError` for ids from another tokenizer or context length."""
    stored = [it.get("tokens") for it in items]
    if not any(stored):
        return None
    mine = tokenizer_identity(tokenizer)
    for s in stored:
        if s is None:
            continue
        if s["tokenizer"].get("digest") != mine["digest"]:
            raise DataError(f"{s['where']}: its shard was pre-tokenised with {_shown(s['tokenizer'])}; this run "
                            f"tokenises with {_shown(mine)}. Write the shards again with this model's "
                            f"tokenizer (--tokenizer), or without --tokenizer to tokenise while training")
        if s["ids"].shape[1] != context_length:
            raise DataError(f"{s['where']}: its stored token ids are {s['ids'].shape[1]} long, the model's "
                            f"context length is {context_length}")
    if not all(stored):
        return None
    import torch  # here: the shard writer and captioning import this module without torch

    ids = torch.from_numpy(np.stack([s["ids"] for s in stored]).astype(np.int64))
    return ids, sum(n > context_length for s in stored for n in s["lengths"])
