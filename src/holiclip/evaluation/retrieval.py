"""Image-text retrieval recall (the COCO / Flickr30k protocol), streamed in chunks.

Text-to-image: a text query hits at k when its own image ranks in the top k images.
Image-to-text: an image query hits at k when any of its texts ranks in the top k texts.

How it streams. A hit at k only needs the *rank* of the best correct item, and that rank is
the number of wrong items scoring at least as high. So one pass over chunks of images
computes ``S = images[chunk] @ texts.T`` (chunk x N_txt) and from it, at once,
* each image row's count of wrong texts at or above its best own text (image-to-text), and
* each text column's running count of wrong images at or above its own image's score
  (text-to-image), added up over the chunks.
Peak memory is the features plus one chunk x N_txt score block (and a same-sized boolean);
every k comes from the same ranks, and the result is exactly that of a dense computation
with the same tie rule (tested). The "correct" scores are computed beforehand as direct dot
products over the (image, text) positive pairs.

Ties. ``ties="pessimistic"`` (default) ranks a correct item below every wrong item with an
equal score, so a collapsed model that gives every pair the same score scores zero, not one;
``"optimistic"`` ranks it above them. Scores closer than ``tie_tol`` count as equal: float32
rounding of the same dot product computed in two ways (a GEMM tile versus a direct dot) differs
by far less than that for unit vectors, which keeps the result independent of chunking.

Equivalent images. ``image_groups`` (one group id per image) widens what counts as correct:
a text's correct images are all images in its image's group, and an image's correct texts are
all texts of images in its group. Use :func:`groups_from_identical_captions` to group images
that share an identical caption (in COCO a few do, and a model cannot tell them apart).
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..models.fusion import fuse

TIE_RULES = ("pessimistic", "optimistic")
DEFAULT_BLOCK_ELEMENTS = 2**25  # scores per chunk: 128 MB in float32


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


def _pair_scores(images: torch.Tensor, texts: torch.Tensor, pairs: torch.Tensor, block: int) -> torch.Tensor:
    out = torch.empty(pairs.shape[0], dtype=images.dtype, device=images.device)
    step = max(1, block // max(1, images.shape[1]))
    for s in range(0, pairs.shape[0], step):
        p = pairs[s : s + step].to(images.device)
        out[s : s + step] = (images[p[:, 0]] * texts[p[:, 1]]).sum(-1)
    return out


def retrieval_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image,
    image_groups=None,
    ties: str = "pessimistic",
    tie_tol: float = 1e-6,
    chunk_size: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the best correct item per query: (i2t per image, t2i per text).

    ``image_features`` must already be (N_img, D) (see :func:`prepare_image_features`).
    Images with no text get rank -1. ``chunk_size`` images per block; by default as many as
    keep a block near 32M scores.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError("retrieval_ranks wants (N_img, D) and (N_txt, D) features")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"feature sizes differ: images D={image_features.shape[1]}, texts D={text_features.shape[1]}")
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    t2i = _as_index(text_to_image, n_txt, n_img)
    device = image_features.device
    dtype = torch.promote_types(image_features.dtype, text_features.dtype)
    images, texts = image_features.to(dtype), text_features.to(device, dtype)

    pairs = positive_pairs(t2i, image_groups, n_img)
    pair_score = _pair_scores(images, texts, pairs, DEFAULT_BLOCK_ELEMENTS)
    neg_inf = torch.tensor(float("-inf"), dtype=dtype)
    # best correct score per text (for t2i) and per image (for i2t)
    best_txt = torch.full((n_txt,), float("-inf"), dtype=dtype).scatter_reduce(0, pairs[:, 1], pair_score.cpu(), "amax")
    best_img = torch.full((n_img,), float("-inf"), dtype=dtype).scatter_reduce(0, pairs[:, 0], pair_score.cpu(), "amax")
    # pessimistic: count wrong scores >= best - tol; optimistic: count wrong scores > best + tol
    shift = -tie_tol if ties == "pessimistic" else tie_tol
    thr_txt = (best_txt + shift).to(device)
    t2i_rank = torch.zeros(n_txt, dtype=torch.long, device=device)
    i2t_rank = torch.empty(n_img, dtype=torch.long)

    step = chunk_size or max(1, DEFAULT_BLOCK_ELEMENTS // max(1, n_txt))
    pair_images = pairs[:, 0].contiguous()
    for start in tqdm(range(0, n_img, step), desc="retrieval", unit="chunk", disable=not progress):
        end = min(start + step, n_img)
        scores = images[start:end] @ texts.T  # (chunk, N_txt)
        lo, hi = torch.searchsorted(pair_images, torch.tensor([start, end]))
        p = pairs[lo:hi].to(device)
        scores[p[:, 0] - start, p[:, 1]] = neg_inf.to(device)  # correct pairs are not competitors
        thr_img = (best_img[start:end] + shift).to(device)
        if ties == "pessimistic":
            i2t_rank[start:end] = (scores >= thr_img[:, None]).sum(1).cpu()
            t2i_rank += (scores >= thr_txt[None, :]).sum(0)
        else:
            i2t_rank[start:end] = (scores > thr_img[:, None]).sum(1).cpu()
            t2i_rank += (scores > thr_txt[None, :]).sum(0)
    i2t_rank[torch.isinf(best_img)] = -1
    return i2t_rank, t2i_rank.cpu()


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
) -> dict[str, float]:
    """Recall@k both ways, as fractions in [0, 1]: ``{"i2t_R@1": ..., "t2i_R@1": ..., ...}``.

    image_features: (N_img, D), or (N_img, H, D) combined with ``fusion`` / ``branches`` /
    ``names`` exactly as :func:`holiclip.fuse` does. text_features: (N_txt, D).
    text_to_image: (N_txt,) image row of each text. Images without any text are left out of
    the image-to-text average. See the module docstring for ties and ``image_groups``.
    """
    images = prepare_image_features(image_features, fusion, branches, names)
    i2t, t2i = retrieval_ranks(images, text_features, text_to_image, image_groups, ties, tie_tol, chunk_size, progress)
    return recall_from_ranks(i2t, t2i, ks)


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
