"""Training datasets: images + M texts per sample, tokenisation, bad-image accounting.

Bad images never crash a run: the sample is replaced by a readable one from outside the
batch (so every rank keeps the same batch size for the feature gather and no sample appears
twice), counted, and summarised; the run stops with a clear message only above
``max_bad_fraction``. Images over a pixel limit are refused from their header, undecoded.
"""
from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler, default_collate

from .manifest import LoadedManifest, load_manifest  # noqa: F401  (imported from here by callers)
from .records import DataError
from .tokens import stack_tokens, tokenize

log = logging.getLogger(__name__)

MAX_SUBSTITUTIONS = 16
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own warning limit (data.max_image_pixels)
# what a broken, truncated or refused image raises while opening / decoding / transforming
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


class ImageTooLarge(OSError):
    """An image over the pixel limit, refused from its header size before any decoding."""


def _name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else "<image bytes>"


def open_image(source, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, raw bytes or a PIL image -> an 8-bit RGB PIL image (OSError if unreadable).

    Images wider than 8 bits are scaled by their mode's range (:func:`to_rgb`). A file with more
    than ``max_pixels`` pixels (None: no limit of ours) raises :class:`ImageTooLarge` from the
    size in its header, before anything is decoded. PIL itself refuses files over
    2 x ``PIL.Image.MAX_IMAGE_PIXELS`` whatever ``max_pixels`` says; that is reported the same way.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        im = Image.open(handle)  # lazy: reads the header only
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {source}") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(_pil_refusal(_name(source), err, max_pixels)) from None
    with im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(
                f"{_name(source)}: {w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,} pixels "
                f"(max_image_pixels); not decoded"
            )
        return to_rgb(im)


def _pil_refusal(name: str, err: Exception, max_pixels: int | None) -> str:
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    msg = (f"{name}: {size}, over PIL's decompression-bomb limit of {pil_limit:,} pixels "
           f"(2 x PIL.Image.MAX_IMAGE_PIXELS); not decoded")
    if max_pixels is None or max_pixels > pil_limit:
        msg += "; max_image_pixels cannot lift PIL's own limit, PIL.Image.MAX_IMAGE_PIXELS can"
    return msg


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB image. PIL's ``convert`` clips greyscale wider than 8 bits (a 16-bit image
    turns white), so those modes are scaled by their range instead: ``I;16*`` 0..65535 (divide
    by 257); ``I`` (32-bit int) 0..65535 when the values fit (PIL decodes 16-bit data, e.g.
    PGM, into it), else 0..2**31-1; ``F`` 0..1 or 0..255 (PIL's float scale) when the values
    fit, else as ``I``. Values outside the range are clipped, NaN is black."""
    if not (im.mode.startswith("I;16") or im.mode in ("I", "F")):
        return im.convert("RGB")
    a = np.asarray(im).astype(np.float64)
    top = _full_scale(im.mode, a)
    grey = np.clip(np.rint(np.nan_to_num(a / (top / 255.0), nan=0.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def _full_scale(mode: str, a: np.ndarray) -> float:
    if mode.startswith("I;16"):
        return 65535.0
    finite = a[np.isfinite(a)]
    hi = float(finite.max()) if finite.size else 0.0
    if mode == "F" and hi <= 1.0:
        return 1.0
    if mode == "F" and hi <= 255.0:
        return 255.0
    return 65535.0 if hi <= 65535.0 else float(2**31 - 1)


class MultiTextDataset(Dataset):
    """Item i -> {"image": the transform's (3, S, S) tensor, "texts": [M strings], "index": i, "bad": [...]}.

    ``cache_images`` decodes every image once into a uint8 tensor (small images, e.g. the
    built-in benchmark), resized and centre-cropped as evaluation does, so an epoch costs no
    decoding at all; ``transform`` then gets that (3, S, S) uint8 tensor (see :func:`tensor_transform`).

    Random augmentation draws from a generator seeded by (seed, epoch, sample), so a sample's
    crop does not depend on worker count, batch order or a resume. The epoch is the one the
    batch's indices carry (:class:`BatchIndices`), else :meth:`set_epoch`'s, so persistent
    DataLoader workers, whose copy of the dataset keeps the epoch they started in, crop right.

    Images over ``max_pixels`` are unreadable ones (:func:`open_image`); an unreadable image is
    replaced as :meth:`__getitems__` describes.
    """

    def __init__(self, manifest: LoadedManifest, transform: Callable, cache_images: bool = False,
                 image_size: int | None = None, seed: int = 0,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.manifest = manifest
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        self.cache = None
        if cache_images:
            self.cache = self._decode_all(image_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def iter_texts(self):
        """Every training text (all slots of every sample, repeats included), for the text cache."""
        for texts in self.manifest.texts:
            yield from texts

    def __len__(self) -> int:
        return len(self.manifest.images)

    def _decode_all(self, image_size):
        from tqdm import tqdm

        arrays, bad = [], {}
        for i, src in enumerate(tqdm(self.manifest.images, desc="decoding images", leave=False)):
            try:
                im = open_image(src, self.max_pixels)
                if image_size and im.size != (image_size, image_size):
                    im = resize_center_crop(im, image_size)
                arrays.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3))
            except UNREADABLE as err:
                arrays.append(None)
                bad[i] = str(err)  # the reason, for the run's bad-image summary
        shape = next((a.shape for a in arrays if a is not None), None)
        if shape is None:
            first = "\n  ".join(self._bad_message(i, OSError(e)) for i, e in list(bad.items())[:5])
            raise DataError(f"{self.manifest.path}: none of the {len(arrays)} images is readable; first:\n  {first}")
        self.cache_bad = bad
        return torch.stack([a if a is not None else torch.zeros(shape, dtype=torch.uint8) for a in arrays])

    def _load(self, i: int, epoch: int) -> torch.Tensor:
        if self.cache is not None:
            if i in self.cache_bad:
                raise OSError(self.cache_bad[i])
            image = self.cache[i].permute(2, 0, 1)
        else:
            image = open_image(self.manifest.images[i], self.max_pixels)
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left untouched
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
            return self.transform(image)

    def _bad_message(self, i: int, err: Exception) -> str:
        src = self.manifest.images[i]
        name = _name(src)
        return f"{self.manifest.where[i]}: {name}: {str(err).removeprefix(name + ': ')}"

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """One batch (the DataLoader hands the sampler's whole batch here).

        An unreadable image is replaced by a readable sample from outside the global batch
        (``indices.global_batch`` from :class:`ResumableBatchSampler`, else ``indices``): a
        sample twice in one batch would be a false negative for the contrastive loss. The
        substitute is drawn from a generator seeded by (seed, epoch, bad index, global batch),
        so a resumed run draws the same ones, and each rank draws from its own residue class
        (index % world_size == rank), so two ranks never pick the same one. Only a dataset
        barely larger than a global batch can force a repeat.
        """
        global_batch = list(getattr(indices, "global_batch", indices))
        rank, world = getattr(indices, "rank", 0), getattr(indices, "world_size", 1)
        epoch = self.epoch if getattr(indices, "epoch", None) is None else indices.epoch
        taken, known_bad = set(global_batch), set()
        out = []
        for index in indices:
            i, bad, rng = index, [], None
            while True:
                try:
                    image = self._load(i, epoch)
                    break
                except UNREADABLE as err:
                    bad.append(self._bad_message(i, err))
                    known_bad.add(i)
                if len(bad) >= MAX_SUBSTITUTIONS:
                    raise DataError(f"{len(bad)} unreadable images in a row replacing {self.manifest.where[index]}; "
                                    f"first: {bad[:3]}")
                if rng is None:
                    rng = np.random.default_rng([self.seed % 2**63, epoch, index, *global_batch])
                i = self._substitute(rng, taken, known_bad, rank, world)
                if i is None:
                    raise DataError(f"no readable image left to replace {self.manifest.where[index]}: {bad[:3]}")
                taken.add(i)
            out.append({"image": image, "texts": self.manifest.texts[i], "index": i, "bad": bad})
        return out

    def _substitute(self, rng: np.random.Generator, taken: set, known_bad: set, rank: int, world: int) -> int | None:
        pool = range(rank % world, len(self), world)
        for _ in range(64):  # rejection sampling: quick while the batch is a small part of the data
            j = pool[int(rng.integers(len(pool)))]
            if j not in taken:
                return j
        for candidates in ([j for j in pool if j not in taken], [j for j in range(len(self)) if j not in taken],
                           [j for j in range(len(self)) if j not in known_bad]):  # last: a repeat is unavoidable
            if candidates:
                return candidates[int(rng.integers(len(candidates)))]
        return None


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """open_clip's evaluation resize (shortest side to ``size``, bicubic, then a centre crop)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    return TF.center_crop(TF.resize(image, size, interpolation=InterpolationMode.BICUBIC), size)


class Normalize:
    """The image transform's last steps, to float and normalise, on a batch wherever it lies (the
    GPU, after a copy of uint8 images 4x smaller than float ones): uint8 (0-255) or float in [0, 1]
    -> ``(x - mean) / std`` in float32, the same arithmetic as torchvision's ``ToTensor`` + ``Normalize``.
    By default open_clip's (OpenAI's) mean and std."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.mean = tuple(float(m) for m in (OPENAI_DATASET_MEAN if mean is None else mean))
        self.std = tuple(float(s) for s in (OPENAI_DATASET_STD if std is None else std))
        self._stats: dict = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            self._stats[device] = tuple(torch.tensor(v, device=device).view(-1, 1, 1) for v in (self.mean, self.std))
        return self._stats[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous()  # a channels-last batch (stack_images): the model gets NCHW as before
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        mean, std = self._on(x.device)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class ToUint8:
    """A PIL image -> its (C, H, W) uint8 tensor, what ``ToTensor`` gives times 255 (tensors pass
    through, as open_clip's ``MaybeToTensor``)."""

    def __call__(self, pic):
        from torchvision.transforms import functional as TF

        if isinstance(pic, torch.Tensor):
            return pic
        if isinstance(pic, Image.Image):
            return TF.pil_to_tensor(pic if pic.mode == "RGB" else pic.convert("RGB"))
        return TF.to_tensor(pic)

    def __repr__(self) -> str:
        return "ToUint8()"


def split_normalize(transform: Callable) -> tuple[Callable, Normalize | None]:
    """open_clip's image transform (a torchvision ``Compose`` ending in ``ToTensor``, ``Normalize``)
    -> (the same steps ending in a uint8 tensor, the :class:`Normalize` to run on the batch). Any
    other transform: (itself, None), its output going to the model as it is."""
    from open_clip.transform import MaybeToTensor
    from torchvision.transforms import Compose, ToTensor
    from torchvision.transforms import Normalize as TVNormalize

    steps = getattr(transform, "transforms", None)
    if not (isinstance(transform, Compose) and len(steps) >= 2 and type(steps[-2]) in (ToTensor, MaybeToTensor)
            and type(steps[-1]) is TVNormalize and not steps[-1].inplace):
        return transform, None
    return Compose([*steps[:-2], ToUint8()]), Normalize(steps[-1].mean, steps[-1].std)


def tensor_transform(image_size: int | tuple[int, int], mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, augment: bool = False,
                     scale: tuple[float, float] = (0.9, 1.0), normalize: bool = True) -> Callable:
    """For images (C, H, W) already at the model's resolution, float in [0, 1] or uint8 (cached
    training images, evaluation inputs): open_clip's training crop (RandomResizedCrop, ``scale``,
    bicubic, on floats) when ``augment``, then normalisation (:class:`Normalize`), by default with
    open_clip's (OpenAI's) mean and std. ``normalize=False`` leaves that to the batch on the device:
    the image comes back unnormalised (uint8 as it came unless cropped)."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    norm = Normalize(mean, std)
    crop = RandomResizedCrop((h, w), scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)

    def apply(x: torch.Tensor) -> torch.Tensor:
        if augment:
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
            x = crop(x).clamp_(0.0, 1.0)  # bicubic overshoots; PIL's clips to [0, 255]
        elif tuple(x.shape[-2:]) != (h, w):
            raise ValueError(f"image is {tuple(x.shape[-2:])}, expected the model's {h}x{w}")
        return norm(x) if normalize else x

    return apply


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, C, H, W), straight into shared memory in a DataLoader worker (default_collate's way: no
    copy on the way out). Images that are HWC arrays seen as CHW (:class:`ToUint8`'s) are stacked as
    they lie, one plain copy, into a channels-last batch (:class:`Normalize` makes it contiguous)."""
    if all(im.dim() == 3 and im.permute(1, 2, 0).is_contiguous() for im in images):
        return default_collate([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)
    return default_collate(list(images))


class Collate:
    """Stacks images (as the transform gives them: uint8 from :func:`split_normalize`, normalised on
    the device); tokenises texts to (B, M, L) and counts truncation (one encode per text), or, with a
    ``text_cache`` (:class:`holiclip.training.text_cache.TextCache`), gathers their frozen trunk
    features (B, M, W) from its files (in the DataLoader worker, off the training loop)."""

    def __init__(self, tokenizer=None, context_length: int = 77, text_cache=None):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.text_cache = text_cache

    def __call__(self, items: list[dict]) -> dict:
        batch_size, num_slots = len(items), len(items[0]["texts"])
        flat = [t for it in items for t in it["texts"]]
        out = {
            "images": stack_images([it["image"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
            "bad": [b for it in items for b in it["bad"]],
            "num_texts": len(flat),
        }
        if self.text_cache is not None:
            out["text_trunk_features"] = self.text_cache.lookup(flat).view(batch_size, num_slots, -1)
            out["truncated"] = 0
        elif (stored := stack_tokens(items, self.tokenizer, self.context_length)) is not None:
            out["texts"], out["truncated"] = stored  # pre-tokenised shards: nothing tokenised here
        else:
            tokens, lengths = tokenize(self.tokenizer, flat)
            out["texts"] = tokens.view(batch_size, num_slots, -1)
            out["truncated"] = sum(n > self.context_length for n in lengths)
        return out


@dataclass(frozen=True)
class EpochSplit:
    """How one epoch's batches are cut over the ranks, kept in checkpoints so that a resume continues
    it exactly, on the same or on another number of ranks.

    The epoch is planned for ``world_size`` ranks (and ``streams`` streams per rank on the shard
    path): ``batches`` per rank, rank-batches of ``batch_size`` samples. Laid out in the order that
    plan trains them (batch 0 of rank 0, of rank 1, ..., then batch 1, ...) they are the epoch's
    *rank-batches* ``0 .. world_size x batches - 1``. A run on ``W`` ranks whose split starts at
    rank-batch ``first`` trains as its batch ``b`` on rank ``r`` the rank-batch
    ``first + b x W + r``: the planned run itself (``first = 0``, ``W = world_size``), or the
    remainder of an epoch a run on other ranks had trained up to rank-batch ``first``, re-cut into
    global batches of ``W`` rank-batches (the samples not yet trained, in the order the planned run
    would have trained them; the last part of a global batch is left out, as drop_last does).
    """

    world_size: int  # the ranks the epoch was planned for
    first: int = 0  # rank-batches of the epoch trained before this split's batch 0
    streams: int = 1  # shards: streams per rank of the plan

    @classmethod
    def resume(cls, state: dict | None, batch_in_epoch: int, world_size: int) -> tuple["EpochSplit | None", int]:
        """The split of a checkpoint's epoch for a run on ``world_size`` ranks (None: this run's own
        plan), and the batch it goes on from.

        ``state``: :meth:`state` of the run that wrote it (``split_world_size`` and ``first``
        missing: a checkpoint from before splits were kept, planned for its own ranks; no state at
        all: taken as planned for this run's ranks). On its own number of ranks the run goes on at
        its ``batch_in_epoch``; on another the rank-batches it trained end the old split and a new
        one starts after them, at batch 0.
        """
        if not state:
            return None, batch_in_epoch
        saved = int(state["world_size"])
        split = cls(int(state.get("split_world_size", saved)), int(state.get("first", 0)), int(state.get("streams", 1)))
        if batch_in_epoch == 0 and split.first == 0:  # nothing of the epoch trained: it is planned afresh
            return None, 0
        if saved == world_size:
            return split, batch_in_epoch
        return replace(split, first=split.first + batch_in_epoch * saved), 0

    def state(self, world_size: int) -> dict:
        return {"world_size": world_size, "split_world_size": self.world_size, "first": self.first,
                "streams": self.streams}

    def untrained(self, samples: int, batch_size: int) -> int:
        """Rank-batches of the plan (an epoch of ``samples``, drop_last) from the split's start on."""
        return max(0, samples // (batch_size * self.world_size) * self.world_size - self.first)

    def batches(self, samples: int, batch_size: int, world_size: int) -> int:
        """Full batches per rank of a run on ``world_size`` ranks."""
        return self.untrained(samples, batch_size) // world_size

    def rank_batch(self, batch: int, rank: int, world_size: int) -> tuple[int, int]:
        """(rank of the plan, its batch) that batch ``batch`` of ``rank`` of a run on ``world_size`` ranks trains."""
        f = self.first + batch * world_size + rank
        return f % self.world_size, f // self.world_size


class SplitEpochs:
    """The epoch splits of a batch source (:class:`ResumableBatchSampler`, the shard stream): this
    run's own plan, or a checkpoint's for the epoch in progress. Needs ``world_size``,
    ``batch_size``, ``epoch``, ``epoch_samples`` (drop_last included) and ``_splits`` (a dict)."""

    default_streams = 1

    def split(self, epoch: int) -> EpochSplit:
        return self._splits.get(epoch) or EpochSplit(self.world_size, 0, self.default_streams)

    def batches(self, epoch: int) -> int:
        """This rank's batches of ``epoch`` (fewer than its own plan's in an epoch resumed on more ranks)."""
        return self.split(epoch).batches(self.epoch_samples, self.batch_size, self.world_size)

    def remainder(self, epoch: int, start_batch: int) -> tuple[int, int]:
        """(samples of ``epoch`` not yet trained, those of them this run trains) from batch ``start_batch`` on:
        after a resume on more ranks, the last part of a global batch is left out (drop_last)."""
        split = self.split(epoch)
        untrained = split.untrained(self.epoch_samples, self.batch_size) - start_batch * self.world_size
        return untrained * self.batch_size, (self.batches(epoch) - start_batch) * self.batch_size * self.world_size

    def state(self) -> dict:
        """What a checkpoint keeps to continue the epoch in progress (the epoch and batch are the trainer's)."""
        return {"epoch": self.epoch, **self.split(self.epoch).state(self.world_size)}

    def load_state(self, state: dict | None, epoch: int, batch_in_epoch: int) -> int:
        """The checkpoint's split of ``epoch``; returns the batch to go on from (0 on another world size).
        Without a state (a checkpoint from before it was kept) the epoch is taken as split for this run's ranks."""
        split, start = EpochSplit.resume(state, batch_in_epoch, self.world_size)
        if split is not None:
            self._splits[epoch] = split
        return start


class ResumableBatchSampler(SplitEpochs, Sampler):
    """Seeded per-epoch permutation; global batch ``b`` is split over ranks in order, so
    ``world_size`` ranks x ``batch_size`` see exactly the samples one process would see with
    the global batch. ``start_batch`` skips already-consumed batches without loading them.

    Rank-batch ``f`` of an epoch (see :class:`EpochSplit`) is ``perm[f x batch_size :][:batch_size]``
    whatever the ranks, so the epoch a checkpoint holds goes on over another number of ranks with
    the permutation's samples not yet trained, in order (:meth:`load_state`)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0
        self._splits: dict[int, EpochSplit] = {}  # from a checkpoint: the split of the epoch in progress
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{num_samples} samples are fewer than one global batch ({batch_size} x {world_size} ranks)"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)  # drop_last

    @property
    def epoch_samples(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches(self.epoch) - self.start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g).tolist()
        split, bs, world = self.split(self.epoch), self.batch_size, self.world_size
        for b in range(self.start_batch, self.batches(self.epoch)):
            first = split.first + b * world  # the global batch's first rank-batch
            mine = first + self.rank
            yield BatchIndices(perm[mine * bs: (mine + 1) * bs], perm[first * bs: (first + world) * bs], self.rank,
                               world, self.epoch)


class BatchIndices(list):
    """One rank's batch indices, plus the global batch they belong to, so that the dataset can
    pick substitutes for unreadable images outside every rank's batch (see
    :meth:`MultiTextDataset.__getitems__`), and the epoch they are drawn for (the sampler runs in
    the training process; a persistent worker's dataset does not follow ``set_epoch``). Compares
    and pickles as a plain list would."""

    def __init__(self, indices: Sequence[int], global_batch: Sequence[int], rank: int = 0, world_size: int = 1,
                 epoch: int | None = None):
        super().__init__(indices)
        self.global_batch = list(global_batch)
        self.rank, self.world_size, self.epoch = rank, world_size, epoch


def check_bad_fraction(bad: int, seen: int, max_fraction: float, examples: Sequence[str]) -> None:
    if seen and bad / seen > max_fraction:
        listing = "\n  ".join(examples[:5])
        raise DataError(
            f"{bad} of {seen} images unreadable ({100 * bad / seen:.1f}% > max_bad_fraction "
            f"{100 * max_fraction:.1f}%); first ones:\n  {listing}"
        )

