"""Image-text retrieval recall (the COCO / Flickr30k protocol), streamed in chunks.

Text-to-image: a text query hits at k when its own image ranks in the top k images.
Image-to-text: an image query hits at k when any of its texts ranks in the top k texts.

How it streams. A hit at k only needs the *rank* of the best correct item, and that rank is
the number of wrong items scoring at least as high. So one pass over blocks of texts (of the
larger side; images when there are more images) computes ``S = texts[block] @ images.T``
(block x N_img) and from it, at once,
* each text row's count of wrong images at or above its own image's score (text-to-image), and
* each image column's running count of wrong texts at or above its best own text
  (image-to-text), added up over the blocks.
Streaming over the larger side means the matrix the GEMM re-reads for every block is the
smaller one. Peak memory is the features plus one reused block of scores (and a small one);
every k comes from the same ranks, and the result is exactly that of a dense computation
with the same tie rule (tested). The "correct" scores are computed beforehand as direct dot
products over the (image, text) positive pairs.

Ties. ``ties="pessimistic"`` (default) ranks a correct item below every wrong item with an
equal score, so a collapsed model that gives every pair the same score scores zero, not one;
``"optimistic"`` ranks it above them. Scores closer than ``tie_tol`` count as equal: float32
rounding of the same dot product computed in two ways (a GEMM tile versus a direct dot) differs
by far less than that for unit vectors, which keeps the result independent of chunking.
``"clip-benchmark"`` (in :func:`recall_at_k`) takes the order ``torch.topk`` gives, as
CLIP_benchmark's ``zeroshot_retrieval`` does, so its published numbers can be reproduced: the
queries whose correct item ties with a wrong one (the two rules above disagree) are scored again
as CLIP_benchmark scores them (``texts @ images.T``, ``topk`` per k); the others need no order.

Equivalent images. ``image_groups`` (one group id per image) widens what counts as correct:
a text's correct images are all images in its image's group, and an image's correct texts are
all texts of images in its group. Use :func:`groups_from_identical_captions` to group images
that share an identical caption (in COCO a few do, and a model cannot tell them apart).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..models.fusion import fuse

RANK_TIE_RULES = ("pessimistic", "optimistic")  # a rank per query, the same for every k
TIE_RULES = RANK_TIE_RULES + ("clip-benchmark",)  # topk's order: a hit per query and k
DEFAULT_BLOCK_ELEMENTS = 2**25  # scores per chunk: 128 MB in float32
PAIR_BLOCK_ELEMENTS = 2**22  # gathered feature values per step when scoring correct pairs


def _as_index(text_to_image, num_texts: int, num_images: int) -> torch.Tensor:
    idx = torch.as_tensor(text_to_image, dtype=torch.long).flatten()
    if idx.numel() != num_texts:
        raise ValueError(f"text_to_image has {idx.numel()} entries but there are {num_texts} text rows")
    if num_texts and (idx.min() < 0 or idx.max() >= num_images):
        bad = int(((idx < 0) | (idx >= num_images)).nonzero()[0])
        raise ValueError(f"text_to_image[{bad}] = {int(idx[bad])} is not an image row (0..{num_images - 1})")
    return idx


def prepare_image_features(
    image_features: torch.Tensor,
    fusion: str = "mean",
    branches: Sequence[str | int] | str | int | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """(N, D) passes through; (N, H, D) is fused with :func:`holiclip.fuse`."""
    if image_features.dim() == 2:
        if branches is not None:
            raise ValueError("branches= needs (N, H, D) image features; got (N, D)")
        return image_features
    if image_features.dim() != 3:
        raise ValueError(f"image features must be (N, D) or (N, H, D), got {tuple(image_features.shape)}")
    return fuse(image_features, mode=fusion, branches=branches, names=names)


def positive_pairs(text_to_image: torch.Tensor, image_groups=None, num_images: int | None = None) -> torch.Tensor:
    """(P, 2) long tensor of correct (image, text) pairs, sorted by image.

    Without groups each text pairs with its own image; with groups with every image of its group.
    """
    texts = torch.arange(text_to_image.numel())
    if image_groups is None:
        pairs = torch.stack([text_to_image, texts], 1)
    else:
        groups = torch.as_tensor(image_groups, dtype=torch.long).flatten()
        if num_images is not None and groups.numel() != num_images:
            raise ValueError(f"image_groups has {groups.numel()} entries but there are {num_images} images")
        _, groups = torch.unique(groups, return_inverse=True)
        order = torch.argsort(groups, stable=True)  # images listed group by group
        sizes = torch.bincount(groups)
        starts = torch.cumsum(sizes, 0) - sizes
        text_group = groups[text_to_image]
        n_per_text = sizes[text_group]
        text_rep = torch.repeat_interleave(texts, n_per_text)
        offsets = torch.arange(text_rep.numel()) - torch.repeat_interleave(torch.cumsum(n_per_text, 0) - n_per_text, n_per_text)
        images = order[starts[text_group[text_rep]] + offsets]
        pairs = torch.stack([images, text_rep], 1)
    return pairs[torch.argsort(pairs[:, 0], stable=True)]


def correct_scores(images: torch.Tensor, texts: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Dot product of each (image, text) pair in ``pairs`` (P, 2), in blocks."""
    out = torch.empty(pairs.shape[0], dtype=images.dtype, device=images.device)
    step = max(1, PAIR_BLOCK_ELEMENTS // max(1, images.shape[1]))
    for s in range(0, pairs.shape[0], step):
        p = pairs[s : s + step].to(images.device)
        out[s : s + step] = (images.index_select(0, p[:, 0]) * texts.index_select(0, p[:, 1])).sum(-1)
    return out


def _stream_counts(rows, cols, pairs, thr_rows, thr_cols, compare, step: int, progress: bool):
    """One pass over ``rows @ cols.T`` in blocks of ``step`` rows. pairs (P, 2) = correct
    (row, col), sorted by row. Returns, per row, the wrong columns scoring past its threshold
    and, per column, the wrong rows scoring past its threshold."""
    n_rows, n_cols = rows.shape[0], cols.shape[0]
    device = rows.device
    count_dtype = torch.float32 if max(n_rows, n_cols) < 2**24 else torch.float64  # exact 0/1 sums
    row_count = torch.empty(n_rows, dtype=torch.long)
    col_count = torch.zeros(n_cols, dtype=torch.float64, device=device)
    # reused blocks: fresh 100+ MB allocations per block cost more than the comparisons
    scores_buf = torch.empty(min(step, n_rows), n_cols, dtype=rows.dtype, device=device)
    sub = max(1, min(step, PAIR_BLOCK_ELEMENTS // max(1, n_cols)))  # rows per row-side comparison
    work_buf = torch.empty(sub, n_cols, dtype=rows.dtype, device=device)
    neg_inf = torch.tensor(float("-inf"), dtype=rows.dtype, device=device)
    pair_rows = pairs[:, 0].contiguous()
    for start in tqdm(range(0, n_rows, step), desc="retrieval", unit="block", disable=not progress):
        end = min(start + step, n_rows)
        scores = scores_buf[: end - start]
        torch.matmul(rows[start:end], cols.T, out=scores)
        lo, hi = torch.searchsorted(pair_rows, torch.tensor([start, end]))
        p = pairs[lo:hi].to(device)
        scores[p[:, 0] - start, p[:, 1]] = neg_inf  # correct pairs are not competitors
        # comparisons written as 0/1 floats into preallocated blocks, then summed: much
        # faster on CPU than bool temporaries and integer reductions
        thr = thr_rows[start:end].to(device)
        for r in range(0, end - start, sub):
            work = work_buf[: min(sub, end - start - r)]
            compare(scores[r : r + sub], thr[r : r + sub, None], out=work)
            row_count[start + r : start + r + work.shape[0]] = work.sum(1, dtype=count_dtype).long().cpu()
        compare(scores, thr_cols, out=scores)
        col_count += scores.sum(0, dtype=count_dtype)
    return row_count, col_count.long().cpu()


def retrieval_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image,
    image_groups=None,
    ties: str = "pessimistic",
    tie_tol: float = 1e-6,
    chunk_size: int | None = None,
    progress: bool = False,
    timings: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the best correct item per query: (i2t per image, t2i per text).

    ``image_features`` must already be (N_img, D) (see :func:`prepare_image_features`).
    Images with no text get rank -1. The pass streams over blocks of the larger side (texts,
    usually), so the matrix re-read for every block is the smaller one; ``chunk_size`` is the
    rows of that side per block, by default as many as keep a block near 32M scores.
    ``timings``, when a dict, receives ``setup_s`` (correct-pair scores) and ``chunks_s``
    (the streamed pass) in seconds.
    """
    if ties not in RANK_TIE_RULES:
        raise ValueError(f"retrieval_ranks: ties must be one of {RANK_TIE_RULES}, got {ties!r}"
                         + (" (recall_at_k takes it)" if ties in TIE_RULES else ""))
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError("retrieval_ranks wants (N_img, D) and (N_txt, D) features")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"feature sizes differ: images D={image_features.shape[1]}, texts D={text_features.shape[1]}")
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    t2i = _as_index(text_to_image, n_txt, n_img)
    clock = time.perf_counter()
    device = image_features.device
    # at least float32: half-precision rounding would exceed tie_tol and make ranks chunk-dependent
    dtype = torch.promote_types(torch.promote_types(image_features.dtype, text_features.dtype), torch.float32)
    images, texts = image_features.to(dtype), text_features.to(device, dtype)

    pairs = positive_pairs(t2i, image_groups, n_img)  # (image, text), sorted by image
    score = correct_scores(images, texts, pairs).cpu()
    # best correct score per image (i2t) and per text (t2i); a wrong item at least this good
    # (pessimistic: >= best - tol) or better (optimistic: > best + tol) ranks above it
    best_img = torch.full((n_img,), float("-inf"), dtype=dtype).scatter_reduce(0, pairs[:, 0], score, "amax")
    best_txt = torch.full((n_txt,), float("-inf"), dtype=dtype).scatter_reduce(0, pairs[:, 1], score, "amax")
    shift = -tie_tol if ties == "pessimistic" else tie_tol
    compare = torch.ge if ties == "pessimistic" else torch.gt
    setup_done = time.perf_counter()

    if n_txt > n_img:
        by_text = pairs[:, [1, 0]][torch.argsort(pairs[:, 1], stable=True)]
        step = chunk_size or max(1, DEFAULT_BLOCK_ELEMENTS // max(1, n_img))
        t2i_rank, i2t_rank = _stream_counts(
            texts, images, by_text, best_txt + shift, (best_img + shift).to(device), compare, step, progress
        )
    else:
        step = chunk_size or max(1, DEFAULT_BLOCK_ELEMENTS // max(1, n_txt))
        i2t_rank, t2i_rank = _stream_counts(
            images, texts, pairs, best_img + shift, (best_txt + shift).to(device), compare, step, progress
        )
    i2t_rank[torch.isinf(best_img)] = -1
    if timings is not None:
        timings.update(setup_s=setup_done - clock, chunks_s=time.perf_counter() - setup_done)
    return i2t_rank, t2i_rank


def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image,
    ks: Sequence[int] = (1, 5, 10),
    fusion: str = "mean",
    branches: Sequence[str | int] | str | int | None = None,
    names: Sequence[str] | None = None,
    image_groups=None,
    ties: str = "pessimistic",
    tie_tol: float = 1e-6,
    chunk_size: int | None = None,
    progress: bool = False,
    timings: dict | None = None,
) -> dict[str, float]:
    """Recall@k both ways, as fractions in [0, 1]: ``{"i2t_R@1": ..., "t2i_R@1": ..., ...}``.

    image_features: (N_img, D), or (N_img, H, D) combined with ``fusion`` / ``branches`` /
    ``names`` exactly as :func:`holiclip.fuse` does. text_features: (N_txt, D).
    text_to_image: (N_txt,) image row of each text. Images without any text are left out of
    the image-to-text average. See the module docstring for ties and ``image_groups``.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    images = prepare_image_features(image_features, fusion, branches, names)
    if ties == "clip-benchmark":
        return _recall_topk_order(images, text_features, text_to_image, ks, image_groups, tie_tol, chunk_size, progress, timings)
    i2t, t2i = retrieval_ranks(
        images, text_features, text_to_image, image_groups, ties, tie_tol, chunk_size, progress, timings
    )
    return recall_from_ranks(i2t, t2i, ks)


def _recall_topk_order(images, texts, text_to_image, ks, image_groups, tie_tol, chunk_size, progress, timings):
    """Recall with CLIP_benchmark's tie rule. A query whose pessimistic and optimistic ranks agree
    has no wrong item tied with its best correct one, so any top-k holds a correct item exactly
    when that rank is below k; only the others need ``topk``, on scores computed as
    CLIP_benchmark computes them (``texts @ images.T``; image queries read its columns)."""
    pess = retrieval_ranks(images, texts, text_to_image, image_groups, "pessimistic", tie_tol, chunk_size, progress, timings)
    opt = retrieval_ranks(images, texts, text_to_image, image_groups, "optimistic", tie_tol, chunk_size, progress)
    dtype = torch.promote_types(torch.promote_types(images.dtype, texts.dtype), torch.float32)
    images, texts = images.to(dtype), texts.to(images.device, dtype)
    n_img, n_txt = images.shape[0], texts.shape[0]
    pairs = positive_pairs(_as_index(text_to_image, n_txt, n_img), image_groups, n_img)  # (image, text)
    out: dict[str, float] = {}
    for d, (direction, n_cols) in enumerate((("i2t", n_txt), ("t2i", n_img))):
        ranks = pess[d]
        hits = {k: ranks < k for k in ks}
        tied = ((pess[d] != opt[d]) & (ranks >= 0)).nonzero().flatten()
        step = chunk_size or max(1, DEFAULT_BLOCK_ELEMENTS // max(1, n_cols))
        query, item = (pairs[:, 0], pairs[:, 1]) if direction == "i2t" else (pairs[:, 1], pairs[:, 0])
        for s in range(0, tied.numel(), step):
            block = tied[s : s + step]
            scores = (texts @ images[block].T).T if direction == "i2t" else texts[block] @ images.T
            row = torch.full((ranks.numel(),), -1, dtype=torch.long)
            row[block] = torch.arange(block.numel())
            mine = row[query] >= 0
            positive = torch.zeros(block.numel(), n_cols, dtype=torch.bool)
            positive[row[query[mine]], item[mine]] = True
            for k in ks:
                top = torch.topk(scores, min(k, n_cols), dim=1).indices.cpu()
                hits[k][block] = positive.gather(1, top).any(1)
        valid = ranks >= 0  # images without texts are left out, as with the other rules
        for k in ks:
            out[f"{direction}_R@{k}"] = float(hits[k][valid].double().mean()) if valid.any() else float("nan")
    return out


def dense_ranks(scores: torch.Tensor, positive: torch.Tensor, ties: str = "pessimistic", tie_tol: float = 1e-6) -> torch.Tensor:
    """Rank of the best correct item per row of a dense (queries, items) score block, by the
    rule of :func:`retrieval_ranks` (the wrong items scoring at least as high, or higher);
    -1 for a row without a correct item. ``positive``: bool, the same shape."""
    if ties not in RANK_TIE_RULES:
        raise ValueError(f"dense_ranks: ties must be one of {RANK_TIE_RULES}, got {ties!r}")
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    best = scores.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)
    wrong = scores.masked_fill(positive, float("-inf"))
    count = (wrong >= best - tie_tol) if ties == "pessimistic" else (wrong > best + tie_tol)
    return torch.where(positive.any(1), count.sum(1), torch.full_like(count.sum(1), -1))


def recall_from_ranks(i2t_rank: torch.Tensor, t2i_rank: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    i2t_rank = i2t_rank[i2t_rank >= 0]
    out = {}
    for direction, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            out[f"{direction}_R@{k}"] = float((ranks < k).double().mean()) if ranks.numel() else float("nan")
    return out


def groups_from_identical_captions(texts: Sequence[str], text_to_image, num_images: int | None = None) -> torch.Tensor:
    """One group id per image: images sharing an identical caption (after stripping and
    lower-casing) fall into the same group (connected components)."""
    t2i = torch.as_tensor(text_to_image, dtype=torch.long).tolist()
    n = num_images if num_images is not None else (max(t2i) + 1 if t2i else 0)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for text, img in zip(texts, t2i):
        key = " ".join(text.lower().split())
        if key in first:
            a, b = root(first[key]), root(img)
            if a != b:
                parent[max(a, b)] = min(a, b)
        else:
            first[key] = img
    return torch.tensor([root(i) for i in range(n)], dtype=torch.long)
