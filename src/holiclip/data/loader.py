"""Training datasets: images + M texts per sample, tokenisation, bad-image accounting.

Bad images never crash a run: the sample is replaced by the next readable one (so every
rank keeps the same batch size for the feature gather), counted, and summarised; the run
stops with a clear message only above ``max_bad_fraction``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from .readers import read_samples
from .records import DataError, apply_missing_slot_policy

MAX_SUBSTITUTIONS = 16


def open_image(source) -> Image.Image:
    """A path, raw bytes or a PIL image -> an RGB PIL image (OSError if unreadable)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with Image.open(handle) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {source}") from None


@dataclass
class LoadedManifest:
    images: list
    texts: list[list[str]]
    where: list[str]
    dropped: int = 0
    bad_rows: int = 0
    meta: list[dict] = field(default_factory=list)


def load_manifest(
    path, slots: Sequence[str], missing_slot_policy: str = "error", list_slots: Sequence[str] | None = None,
    on_bad_row: str = "error",
) -> LoadedManifest:
    """Reads a whole manifest, applying the missing-slot policy per row."""
    stats: dict = {}
    out = LoadedManifest([], [], [])
    for sample in read_samples(path, list_slots=list_slots, on_error=on_bad_row, stats=stats):
        texts = apply_missing_slot_policy(sample.captions, slots, missing_slot_policy, sample.where)
        if texts is None:
            out.dropped += 1
            continue
        out.images.append(sample.image)
        out.texts.append(texts)
        out.where.append(sample.where)
        out.meta.append(sample.meta)
    out.bad_rows = stats.get("bad_rows", 0)
    if not out.images:
        raise DataError(f"{path}: no usable samples (dropped {out.dropped}, bad rows {out.bad_rows})")
    return out


class MultiTextDataset(Dataset):
    """Item i -> {"image": (3, S, S) float tensor, "texts": [M strings], "index": i, "bad": [...]}.

    ``cache_images`` decodes every image once into a uint8 tensor (small images, e.g. the
    built-in benchmark), resized and centre-cropped as evaluation does, so an epoch costs no
    decoding at all; ``transform`` then gets a float tensor in [0, 1] (see :func:`tensor_transform`).

    Random augmentation draws from a generator seeded by (seed, epoch, sample), so a sample's
    crop does not depend on worker count, batch order or a resume.
    """

    def __init__(self, manifest: LoadedManifest, transform: Callable, cache_images: bool = False,
                 image_size: int | None = None, seed: int = 0):
        self.manifest = manifest
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.cache = None
        if cache_images:
            self.cache = self._decode_all(image_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.manifest.images)

    def _decode_all(self, image_size):
        from tqdm import tqdm

        arrays, bad = [], []
        for i, src in enumerate(tqdm(self.manifest.images, desc="decoding images", leave=False)):
            try:
                im = open_image(src)
                if image_size and im.size != (image_size, image_size):
                    im = resize_center_crop(im, image_size)
                arrays.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3))
            except (OSError, UnidentifiedImageError, ValueError):
                arrays.append(None)
                bad.append(i)
        shape = next(a.shape for a in arrays if a is not None)
        self.cache_bad = set(bad)
        return torch.stack([a if a is not None else torch.zeros(shape, dtype=torch.uint8) for a in arrays])

    def _load(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            if i in self.cache_bad:
                raise OSError("unreadable image")
            image = self.cache[i].permute(2, 0, 1).float().div_(255.0)
        else:
            image = open_image(self.manifest.images[i])
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left untouched
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            return self.transform(image)

    def __getitem__(self, index: int) -> dict:
        bad = []
        for k in range(MAX_SUBSTITUTIONS):
            i = (index + k) % len(self)
            try:
                image = self._load(i)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
                src = self.manifest.images[i]
                bad.append(f"{self.manifest.where[i]}: {src if isinstance(src, str) else '<bytes>'}: {err}")
                continue
            return {"image": image, "texts": self.manifest.texts[i], "index": i, "bad": bad}
        raise DataError(f"{MAX_SUBSTITUTIONS} unreadable images in a row near {self.manifest.where[index]}: {bad[:3]}")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """open_clip's evaluation resize (shortest side to ``size``, bicubic, then a centre crop)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    return TF.center_crop(TF.resize(image, size, interpolation=InterpolationMode.BICUBIC), size)


def tensor_transform(image_size: int, mean: Sequence[float], std: Sequence[float], augment: bool = False,
                     scale: tuple[float, float] = (0.9, 1.0)) -> Callable:
    """For cached float images already at the model's resolution: open_clip's training crop
    (RandomResizedCrop, ``scale``, bicubic) when ``augment``, then normalisation."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    crop = RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)

    def apply(x: torch.Tensor) -> torch.Tensor:
        if augment:
            x = crop(x).clamp_(0.0, 1.0)  # bicubic overshoots; PIL's clips to [0, 255]
        elif x.shape[-1] != image_size or x.shape[-2] != image_size:
            raise ValueError(f"cached image is {tuple(x.shape[-2:])}, expected {image_size}x{image_size}")
        return (x - mean_t) / std_t

    return apply


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


class Collate:
    """Stacks images; tokenises texts to (B, M, L) or maps them to cache rows; counts truncation."""

    def __init__(self, tokenizer=None, context_length: int = 77, text_index: dict[str, int] | None = None):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.text_index = text_index

    def __call__(self, items: list[dict]) -> dict:
        batch_size, num_slots = len(items), len(items[0]["texts"])
        flat = [t for it in items for t in it["texts"]]
        out = {
            "images": torch.stack([it["image"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
            "bad": [b for it in items for b in it["bad"]],
            "num_texts": len(flat),
        }
        if self.text_index is not None:
            out["text_ids"] = torch.tensor([self.text_index[t] for t in flat]).view(batch_size, num_slots)
            out["truncated"] = 0
        else:
            tokens = self.tokenizer(flat)
            out["texts"] = tokens.view(batch_size, num_slots, -1)
            out["truncated"] = sum(n > self.context_length for n in token_lengths(self.tokenizer, flat))
        return out


class ResumableBatchSampler(Sampler):
    """Seeded per-epoch permutation; global batch ``b`` is split over ranks in order, so
    ``world_size`` ranks x ``batch_size`` see exactly the samples one process would see with
    the global batch. ``start_batch`` skips already-consumed batches without loading them."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{num_samples} samples are fewer than one global batch ({batch_size} x {world_size} ranks)"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)  # drop_last

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g).tolist()
        gb = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * gb + self.rank * self.batch_size
            yield perm[start: start + self.batch_size]


def check_bad_fraction(bad: int, seen: int, max_fraction: float, examples: Sequence[str]) -> None:
    if seen and bad / seen > max_fraction:
        listing = "\n  ".join(examples[:5])
        raise DataError(
            f"{bad} of {seen} images unreadable ({100 * bad / seen:.1f}% > max_bad_fraction "
            f"{100 * max_fraction:.1f}%); first ones:\n  {listing}"
        )


def unique_texts(manifest: LoadedManifest) -> list[str]:
    return sorted({t for texts in manifest.texts for t in texts})
