"""Webdataset shards as every path sees them: which sources are shards, a sample's id, its
members and its captions in named slots. The training stream (:mod:`holiclip.data.shards`), the
manifest / evaluation reader (:func:`read_webdataset`), the captioning and search image source
(:class:`holiclip.captioning.sources.ImageSource`), ``caption merge``'s web captions and the shard
writer (:mod:`holiclip.data.sharding`) all go through this module, so a sample has the same slots
and the same id whichever of them reads it.

- Shards: a list (or a ``::``-separated string) of shards or patterns, a brace pattern
  (``dir/shard-{000000..000009}.tar``), a ``.tar`` / ``.tar.gz`` / ``.tgz`` file, a folder holding
  such files, or any URL webdataset opens (``pipe:...``, ``http(s)://``, ``gs://``, ...) or fsspec
  does (``s3://``, ...). Expanded with webdataset's ``expand_urls``.
- Members: ``__key__`` is webdataset's (``base_plus_ext``: the name up to the first dot of the file
  part), member names are lower case. The image is the first of :data:`IMAGE_MEMBERS` present.
- Captions: the ``json`` member is parsed as a row of a JSONL manifest is (``captions``: named
  slots; ``caption``: the research format, a string or list whose positions ``list_slots`` names,
  else ``text0``, ``text1``, ...), so a sample reads the same as a manifest or as shards. When the
  json has neither (img2dataset's json holds metadata only, or there is no json), a ``txt`` member
  is the **web** caption: slot ``web``, or the first of ``list_slots`` when they are given. A txt
  member is by construction the one web caption of an image (img2dataset's ``--caption_col``,
  open_clip's ``txt``), so it takes the name training, ``caption merge`` and the configs give that
  caption (``data.slots`` defaults to ``[web]``); ``text0`` would name a position in a list, which
  a txt member does not have. (Evaluation and search used to call it ``text0`` and training
  ``web``: a model trained on such shards could not be evaluated on them by slot.)
- Ids: ``<shard>::<__key__>`` (:func:`sample_id`), the shard as an absolute path when it is a
  local file (as given when it is a URL), so a re-run from another folder finds the same ids.
  Messages name a sample ``<shard as given>:<__key__>`` (:func:`where`).
- Pre-tokenised shards (:mod:`holiclip.data.tokens`): a ``tokens.npy`` member (the captions' token
  ids, one row per slot) beside the json, whose ``tokens`` field names the tokenizer and slots.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

from .records import DataError, Sample, captions_from_row

# image members of a sample, by preference (what the shard writer writes: jpg, png or webp)
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TEXT_MEMBERS = ("json", "txt")  # members that hold captions (a text-only pass reads only these)
TOKENS_MEMBER = "tokens.npy"  # pre-tokenised captions, see holiclip.data.tokens
SHARD_EXTS = (".tar", ".tar.gz", ".tgz")
ID_SEP = "::"  # sample id: <shard>::<key>
WEB_SLOT = "web"  # the slot of a txt member (the web caption)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BRACES = re.compile(r"\{[^}]*(\.\.|,)[^}]*\}")


# -- which sources are shards ---------------------------------------------------------------------
def shard_urls(source) -> list[str] | None:
    """The shard URLs of a source (see the module docstring), or None when it is something else
    (a JSONL / CSV manifest, an image list, a folder without shards). Telling needs no webdataset;
    expanding a pattern or list does."""
    if isinstance(source, (list, tuple)):
        return [url for item in source for url in _expand(str(item))]
    text = str(source)
    if "::" in text:
        return [url for part in text.split("::") for url in (shard_urls(part) or [part])]
    if is_url(text):
        return _expand(text)
    path = Path(text)
    if path.is_dir():
        tars = sorted(str(p) for p in path.iterdir() if p.name.endswith(SHARD_EXTS) and p.is_file())
        return tars or None  # a folder without shards: the caller names what it holds
    if text.endswith(SHARD_EXTS) or _BRACES.search(text):
        return _expand(text)
    return None


def _expand(text: str) -> list[str]:
    from holiclip._extras import require

    return require("webdataset.shardlists", "train", "reading webdataset shards").expand_urls(text)


def is_url(text: str) -> bool:
    """A URL or a command (``pipe:``), not a local path."""
    return text.startswith("pipe:") or bool(SCHEME.match(text))


# -- ids ----------------------------------------------------------------------------------------------
def sample_id(url: str, key: str) -> str:
    """A sample's id: ``<absolute shard path>::<key>`` (a URL stays as it is)."""
    shard = url if is_url(url) else os.path.abspath(url)
    return f"{shard}{ID_SEP}{key}"


def split_sample_id(image: str) -> tuple[str, str] | None:
    """``(shard, key)`` of a :func:`sample_id`, or None when ``image`` is not one (a file path)."""
    start = 0
    while (cut := image.find(ID_SEP, start)) >= 0:
        if image[:cut].endswith(SHARD_EXTS):
            return image[:cut], image[cut + len(ID_SEP):]
        start = cut + 1
    return None


def where(raw: dict, url: str | None = None) -> str:
    """A sample named in messages: ``<shard>:<key>``."""
    return f"{url or raw.get('__url__', '?')}:{raw.get('__key__', '?')}"


# -- members --------------------------------------------------------------------------------------------
def members(raw: dict) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))


def image_member(raw: dict) -> str | None:
    """The member holding the sample's image, or None."""
    return next((k for k in IMAGE_MEMBERS if k in raw), None)


def no_image(raw: dict) -> str:
    return f"no image member ({'/'.join(IMAGE_MEMBERS)}; members: {', '.join(members(raw))})"


def json_row(raw: dict, place: str) -> dict:
    """The json member as an object ({} when there is none)."""
    if "json" not in raw:
        return {}
    try:
        row = json.loads(raw["json"])
    except json.JSONDecodeError as err:
        raise DataError(f"{place}: malformed json member ({err.msg}, line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{place}: json member is not valid UTF-8 (byte {err.start})") from None
    if not isinstance(row, dict):
        raise DataError(f"{place}: json member must be an object")
    return row


def sample_captions(raw: dict, place: str, list_slots: Sequence[str] | None = None,
                    row: dict | None = None) -> dict[str, str]:
    """The sample's captions in named slots (the rule in the module docstring); a
    :class:`DataError` naming ``place`` when there are none or a member is malformed.
    ``row``: the json member already parsed by :func:`json_row`."""
    row = json_row(raw, place) if row is None else row
    if "captions" in row or "caption" in row:
        return captions_from_row(row, place, list_slots)
    if "txt" in raw:
        try:
            return {(list(list_slots) if list_slots else [WEB_SLOT])[0]: raw["txt"].decode("utf-8")}
        except UnicodeDecodeError as err:
            raise DataError(f"{place}: txt member is not valid UTF-8 (byte {err.start})") from None
    if "json" in raw:
        return captions_from_row(row, place, list_slots)  # names what the json lacks
    raise DataError(f"{place}: no json or txt member with captions (members: {', '.join(members(raw))})")


# -- reading whole shards (evaluation, captioning, caption merge) -------------------------------------
def iter_raw(urls: str | Sequence[str], what: str) -> Iterator[dict]:
    """Every sample of the shards in order, as webdataset's dict of raw members."""
    from holiclip._extras import require

    wds = require("webdataset", "train", what)
    found = shard_urls(urls) if isinstance(urls, str) else list(urls)
    if not found:
        return
    yield from wds.WebDataset(found, shardshuffle=False, empty_check=False)


def read_webdataset(urls: str | Sequence[str], list_slots: Sequence[str] | None = None) -> Iterator[Sample]:
    """Shards -> :class:`Sample` (image bytes, named captions, ``where`` = ``shard:key``,
    ``meta`` = ``{"key": __key__, "id": sample_id}``); a sample without image or captions is a
    :class:`DataError` naming it."""
    for raw in iter_raw(urls, "reading webdataset shards"):
        place = where(raw)
        ext = image_member(raw)
        if ext is None:
            raise DataError(f"{place}: {no_image(raw)}")
        yield Sample(raw[ext], sample_captions(raw, place, list_slots), place,
                     {"key": raw["__key__"], "id": sample_id(str(raw["__url__"]), raw["__key__"])})
