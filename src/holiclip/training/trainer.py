"""The training loop: one process or torchrun, exact resume, bad-input accounting."""
from __future__ import annotations

import gc
import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.loader import (
    Collate, MultiTextDataset, Normalize, ResumableBatchSampler, check_bad_fraction, load_manifest, split_normalize,
    tensor_transform,
)
from ..data.records import DataError
from ..data.shards import ShardStream, shard_sizes, shard_urls
from ..io import jsonl_rows
from ..loss import M2MLoss, gather_problem
from ..models.registry import create_model, get_tokenizer, get_transforms, save_model
from . import checkpoint as ckpt
from .accumulate import backward_as_one_batch
from .config import ConfigError, TrainConfig, reporters, save_config
from .distributed import all_gather_objects, cleanup, exchange, init_distributed
from .evaluate import evaluate
from .logger import MetricLogger
from .schedule import create_optimizer, warmup_cosine
from .text_cache import TextCache, fill_text_cache

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def autocast_for(precision: str, device: str):
    """fp32 on CPU by default: on AVX2-only CPUs bf16 matmuls are ~100x slower."""
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    if precision == "fp32":
        return nullcontext(), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.split(":")[0]) if precision == "amp" else None
    return torch.autocast(device.split(":")[0], dtype=dtype), scaler


def compile_for(net: torch.nn.Module, device: str, checkpointing: bool = False) -> torch.nn.Module:
    """torch.compile of the module the forward calls (DDP included, so its gradient buckets stay
    overlapped); the model itself is not wrapped, so its state_dict keys, checkpoints and saved
    models are the same as without compiling."""
    if checkpointing and isinstance(net, torch.nn.parallel.DistributedDataParallel):
        # as open_clip: dynamo's DDP optimiser splits the graph at gradient-bucket boundaries, which
        # activation checkpointing's regions cross; one whole graph instead (buckets still overlap)
        torch._dynamo.config.optimize_ddp = False
    if not device.startswith("cuda"):  # inductor's CPU code is C++: say so before the first step, not inside it
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            raise ValueError("run.compile=true on CPU: torch.compile needs a C++ compiler and none was found "
                             "(g++ or $CXX); install one (e.g. apt-get install g++) or set run.compile=false") from None
    return torch.compile(net)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None, overwrite: bool = False,
                 allow_world_size_change: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.allow_world_size_change = allow_world_size_change  # --resume latest on another number of ranks
        self.overwrite = overwrite  # delete the previous run in run.out (checkpoint.RUN_OUTPUTS) first
        self.device = resolve_device(cfg.run.device)
        self.dist = init_distributed(self.device, timeout=cfg.run.dist_timeout)
        if self.dist.enabled and self.device.startswith("cuda"):
            self.device = f"cuda:{self.dist.local_rank}"
        if self.device.startswith("cuda"):  # TF32 for fp32 matmuls (as open_clip); cuDNN's convolutions use it by default
            torch.set_float32_matmul_precision("high")
        self.out = Path(cfg.run.out)
        self.ckpt_dir = self.out / "checkpoints"

    # -- set-up ----------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.run.seed)
        self.model = create_model(
            cfg.model.name, encoder=cfg.model.encoder, branches=cfg.branches, pretrained=cfg.model.pretrained,
            mlp_layers=cfg.model.mlp_layers, lock_text=cfg.model.lock_text,
        ).to(self.device)
        if cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.tokenizer = get_tokenizer(cfg.model.name)
        self.shards = shard_urls(cfg.data.train)  # webdataset shards are streamed; None: a JSONL / CSV manifest
        if self.shards is None and (cfg.data.resampled or cfg.data.train_num_samples is not None):
            raise DataError(f"data.resampled and data.train_num_samples apply to webdataset shards; data.train="
                            f"{cfg.data.train} is a manifest, whose epoch is all its rows")
        self.manifest = None if self.shards else load_manifest(
            cfg.data.train, cfg.data.slots, cfg.data.missing_slot_policy, cfg.data.list_slots, cfg.data.on_bad_row
        )
        if self.manifest is not None and self.dist.is_main:  # rows skipped (on_bad_row=skip) or dropped: a warning
            self.manifest.report()
        size = self.model.image_size[0] if isinstance(self.model.image_size, tuple) else self.model.image_size
        # open_clip's training transform (RandomResizedCrop, scale 0.9-1.0) as the research code, unless
        # data.augment=false; the cached path crops the same way from evaluation-resized images. The
        # loader stops at uint8 images; self.normalize (float, mean / std) runs on the device in _forward
        transform, self.normalize = (
            (tensor_transform(size, augment=cfg.data.augment, normalize=False), Normalize())
            if cfg.data.cache_images else split_normalize(get_transforms(self.model, is_train=cfg.data.augment))
        )
        self.dataset = self._shard_stream(transform) if self.shards else MultiTextDataset(
            self.manifest, transform, cache_images=cfg.data.cache_images, image_size=size, seed=cfg.run.seed,
            max_pixels=cfg.data.max_image_pixels)
        # a frozen text trunk: its features come from an on-disk, memory-mapped cache, gathered per
        # batch by the loader's workers (never all in memory); a trainable one: nothing is built.
        # The texts not recorded complete are computed by all ranks, each its share (text_cache.py)
        self.text_cache, self.text_cache_filled = None, None
        if cfg.data.text_cache == "auto" and self.model.text_trunk_frozen():
            self.text_cache = TextCache.open(cfg.run.cache_dir, self.model, self.tokenizer)
            filled = fill_text_cache(self.text_cache, self.dataset, self.model, self.tokenizer, self.device,
                                     self.dist.rank, self.dist.world_size, progress=cfg.run.progress)
            self.text_cache_filled = filled
            if self.dist.is_main:
                log.info("text cache %s: %d of %d sources complete already, %d read over %d ranks: %d texts, "
                         "%d new features, %d in all", self.text_cache.path, filled["complete"], filled["sources"],
                         filled["read"], self.dist.world_size, filled["texts"], filled["new"], filled["rows"])
        self.sampler = None if self.shards else ResumableBatchSampler(
            len(self.dataset), cfg.optim.batch_size, self.dist.rank, self.dist.world_size, cfg.run.seed
        )
        self.collate = Collate(self.tokenizer, self.model.context_length, text_cache=self.text_cache)
        self.loss_fn = M2MLoss(
            local_loss=cfg.loss.local_loss, gather_with_grad=cfg.loss.gather_with_grad, rank=self.dist.rank,
            world_size=self.dist.world_size, diversity_margin=cfg.loss.diversity_margin,
            diversity_weight=cfg.loss.diversity_weight, fused_weight=cfg.loss.fused_weight,
            free_matching=cfg.loss.free_matching,
        )
        self.optimizer = create_optimizer(
            self.model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps
        )
        self.scheduler = warmup_cosine(self.optimizer, cfg.optim.warmup_steps, cfg.optim.steps, cfg.optim.min_lr_ratio)
        self.autocast, self.scaler = autocast_for(cfg.run.precision, self.device)
        self.net = self.model
        if self.dist.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.startswith("cuda") else None
            )
        if cfg.run.compile:
            self.net = compile_for(self.net, self.device, checkpointing=cfg.model.grad_checkpointing)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.counters = {"seen": 0, "bad": 0, "truncated": 0, "texts": 0,
                         **(self.dataset if self.shards else self.manifest).counts()}
        self.bad_examples: list[str] = []

    def _shard_stream(self, transform) -> ShardStream:
        d = self.cfg.data
        if d.cache_images:
            raise DataError(f"data.cache_images decodes a whole manifest into memory once; webdataset shards "
                            f"(data.train={d.train}) are streamed and decoded as they come: set data.cache_images=false")
        sizes = shard_sizes(self.shards, self.dist.rank, self.dist.world_size)  # read, or counted by all ranks
        stream = ShardStream(
            self.shards, d.slots, self.cfg.optim.batch_size, transform, seed=self.cfg.run.seed, rank=self.dist.rank,
            world_size=self.dist.world_size, shuffle_buffer=d.shuffle_buffer, num_samples=d.train_num_samples,
            resampled=d.resampled, list_slots=d.list_slots, missing_slot_policy=d.missing_slot_policy,
            on_bad_row=d.on_bad_row, max_pixels=d.max_image_pixels, sizes=sizes, workers=d.workers,
        )
        if self.dist.is_main:
            log.info("data: %s", stream.describe())
        return stream

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "counters": dict(self.counters), "bad_examples": self.bad_examples[:20], "rng": ckpt.rng_state(),
            "config": self.cfg.to_dict(),  # a resume with other training settings is caught
            # a resume on other ranks is caught (or continues the epoch over them: how it is split)
            "world_size": self.dist.world_size, "global_batch": self._global_batch(),
            **({"data_stream": self.dataset.state()} if self.shards else {"data_sampler": self.sampler.state()}),
        }

    def _global_batch(self) -> int:
        return self.cfg.optim.batch_size * self.cfg.optim.accum_steps * self.dist.world_size

    def _restore(self, path: Path, state: dict | None = None) -> None:
        state = ckpt.load_checkpoint(path) if state is None else state
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        source = self.dataset if self.shards else self.sampler
        trained = self.batch_in_epoch
        self.batch_in_epoch = source.load_state(state.get("data_stream" if self.shards else "data_sampler"),
                                                self.epoch, self.batch_in_epoch)
        saved = ckpt.saved_world_size(state)
        if self.dist.is_main and saved is not None and saved != self.dist.world_size:
            self._note_world_change(state, saved, trained, source)
        self.counters.update(state["counters"])
        self.bad_examples = list(state["bad_examples"])
        ckpt.set_rng_state(state["rng"])

    def _note_world_change(self, state: dict, saved: int, trained: int, source) -> None:
        untrained, trains = source.remainder(self.epoch, self.batch_in_epoch)
        world, left = ckpt.ranks(self.dist.world_size), untrained - trains
        log.warning("resuming on %s a run trained on %s (%d batches of epoch %d trained): global batch %s -> %d; the "
                    "epoch's %d samples not yet trained go on in their order over the %s (%d batches per rank%s)",
                    world, ckpt.ranks(saved), trained, self.epoch, ckpt.saved_global_batch(state) or "?",
                    self._global_batch(), untrained, world, trains // (self.cfg.optim.batch_size * self.dist.world_size),
                    f"; the last {left} left out, less than a global batch" if left else "")

    # -- loop ------------------------------------------------------------------------------
    def _batches(self):
        pin = self.device.startswith("cuda")  # page-locked: the copies to the GPU run asynchronously
        loader = None
        while True:
            if self.shards:  # each stream skips the samples of the batches consumed, undecoded
                self.dataset.set_epoch(self.epoch, self.batch_in_epoch)
                loader = self.dataset.loader(self.collate, self.cfg.data.workers, pin_memory=pin)
            else:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                self.dataset.set_epoch(self.epoch)
                if loader is None:  # workers kept over epochs: the sampler, run here, hands each batch its epoch
                    loader = DataLoader(
                        self.dataset, batch_sampler=self.sampler, collate_fn=self.collate, pin_memory=pin,
                        num_workers=self.cfg.data.workers, persistent_workers=self.cfg.data.workers > 0,
                    )
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self._end_epoch()
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _summarise(self, when: str) -> None:
        c = self.counters
        if self.dist.is_main and (c["bad"] or c["truncated"]):
            log.info("%s: %d unreadable images skipped of %d seen; %d of %d texts truncated to %d tokens",
                     when, c["bad"], c["seen"], c["truncated"], c["texts"], self.model.context_length)
        if self.dist.is_main and self.shards and (c["bad_rows"] or c["dropped"]):
            log.warning("%s: %d samples left out of the shards and replaced: %d malformed or missing "
                        "(data.on_bad_row=skip), %d lacking a slot (data.missing_slot_policy=drop)",
                        when, c["bad_rows"] + c["dropped"], c["bad_rows"], c["dropped"])

    def _end_epoch(self) -> None:
        self._summarise(f"epoch {self.epoch}")
        c = self.counters
        check_bad_fraction(c["bad"], c["seen"], self.cfg.data.max_bad_fraction, self.bad_examples)

    def _forward_loss(self, batch) -> dict:
        return self._loss(self._forward(batch))

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """The loader's (uint8) images on the device, as the model takes them (float, normalised)."""
        images = images.to(self.device, non_blocking=True)
        return images if self.normalize is None else self.normalize(images)

    def _forward(self, batch) -> dict:
        """The model outputs the loss takes: per-sample features and the shared logit scale."""
        images = self._images(batch["images"])
        with self.autocast:
            if "text_trunk_features" in batch:  # a frozen trunk's cached outputs (see Collate)
                trunk = batch["text_trunk_features"].to(self.device, non_blocking=True)
                out = self.net(images=images, text_trunk_features=trunk)
            else:
                out = self.net(images=images, texts=batch["texts"].to(self.device, non_blocking=True))
        return out

    def _loss(self, out: dict) -> dict:
        # the loss in fp32 outside autocast: bf16 logits (8-bit mantissa) blur the softmax over the batch
        return self.loss_fn(out["image_features"].float(), out["text_features"].float(),
                            out["logit_scale"].float(), output_dict=True)

    def train(self) -> dict:
        cfg = self.cfg
        self._check_loss_settings()
        # before the slow build: a run folder holding another run stops the run (or is cleared with
        # overwrite), a damaged checkpoint is named; rank 0 alone touches files, all ranks fail alike
        ckpt.on_main(lambda: ckpt.prepare_run_folder(self.out, self.resume, self.overwrite), self.dist.is_main)
        resume_path, state = ckpt.resume_state(self.resume, self.ckpt_dir, self.dist.is_main)
        if resume_path is not None:
            ckpt.check_resume_config(resume_path, state.get("config"), cfg.to_dict(), self.resume,
                                     warn=self.dist.is_main)
            ckpt.check_resume_world(resume_path, state, self.dist.world_size, self._global_batch(), self.resume,
                                    self.allow_world_size_change, warn=self.dist.is_main)
        self._build()
        if resume_path is not None:
            try:
                self._restore(resume_path, state)
            except (RuntimeError, ValueError, KeyError) as err:  # state of another model / optimizer
                detail = " ".join(str(err).split())
                raise ckpt.CheckpointError(f"checkpoint {resume_path} does not fit this run's config: "
                                           + (detail[:300] + " ..." if len(detail) > 300 else detail)) from err
            state = None  # the loaded checkpoint is not held for the rest of the run
            if self.dist.is_main:
                log.info("resumed from %s at step %d", resume_path, self.step)
        start = self.step
        self.metrics = MetricLogger(self.out, enabled=False)  # rank 0's writes: opened by _open_run_folder
        ckpt.on_main(lambda: self._open_run_folder(start), self.dist.is_main)  # its error reaches every rank
        logger = self.metrics
        batches = self._batches()
        accum = cfg.optim.accum_steps
        end = cfg.optim.steps if cfg.run.max_steps_this_run is None else min(
            cfg.optim.steps, self.step + cfg.run.max_steps_this_run)
        global_batch = self._global_batch()
        progress = logger.progress(total=cfg.optim.steps, initial=self.step, disable=not cfg.run.progress)
        last = dict(logger.last_row or {})  # stands when nothing is left to train
        self.model.train()
        self._nonfinite = None  # device record of the first non-finite loss since the last check
        t0, samples_since, waited = time.perf_counter(), 0, 0.0
        failed = None  # an error of this rank, raised on every rank at the next exchange
        while self.step < end:
            fetched = time.perf_counter()
            micro_batches = []
            try:  # a loader worker's DataError, a TextCacheMiss, the bad-fraction check at an epoch's end, ...
                if failed is None:
                    micro_batches = [next(batches) for _ in range(accum)]
            except Exception as err:
                failed = err
            waited += time.perf_counter() - fetched  # blocked on the loader
            # the step's one collective on the host: counters, the loader's wait, and stop flags
            self._account(micro_batches, failed, waited)
            losses = self._train_step(micro_batches)
            self._watch_finite(losses)
            self.step += 1
            samples_since += global_batch
            evals = cfg.eval.every is not None and (self.step % cfg.eval.every == 0 or self.step == cfg.optim.steps)
            logs = self.step % cfg.run.log_every == 0 or self.step == end or evals  # an evaluation's row has the loss
            saves = self.step % cfg.run.save_every == 0 or self.step == end
            # other steps read nothing from the device: the next step is queued while the GPU works. At a
            # log or save step, one all-reduce and one read of the loss: a non-finite loss since the last
            # check stops every rank here, before anything is saved (the steps in between trained on it)
            if logs or saves:
                last, logit_scale = self._checked_terms(losses)
            if saves:  # before the evaluation: a failed one stops the run with this step saved
                self._save()
            evaluated = {}
            if evals:  # its time is left out of the step's samples/s
                began = time.perf_counter()
                evaluated = evaluate(self.model, self.tokenizer, cfg, self.dist, self.device)
                evaluated["eval_s"] = time.perf_counter() - began
                t0 += evaluated["eval_s"]
            if logs:
                dt = time.perf_counter() - t0
                rate = samples_since / dt if dt > 0 else 0.0
                data_wait = self.data_wait / dt if dt > 0 else 0.0
                try:  # rank 0 writes; its error stops every rank at the next exchange
                    logger.log(self.step, {**last, "lr": self.scheduler.get_last_lr()[0], "logit_scale": logit_scale,
                                           "samples_per_s": rate, "samples_per_s_per_device": rate / self.dist.world_size,
                                           "data_wait": data_wait, "epoch": self.epoch,
                                           **{f"data/{k}": v for k, v in self.counters.items()}, **evaluated})
                except Exception as err:
                    failed = err
                t0, samples_since, waited = time.perf_counter(), 0, 0.0
                progress.set_postfix(loss=f"{last['loss']:.3f}", ips_per_device=f"{rate / self.dist.world_size:.0f}",
                                     data_wait=f"{data_wait:.0%}")
            progress.update(1)
        progress.close()
        logger.close()
        self._summarise(f"end of run (step {self.step})")
        if self.dist.is_main and failed is None and self.step >= cfg.optim.steps:
            try:
                save_model(self.model, self.out / "model", extra={"train_config": cfg.to_dict()})
            except Exception as err:
                failed = err
        # the run's last collective, which no rank leaves before all have come: an error of the last
        # step or of the model's save stops every rank
        exchange(self.dist, [], failed)
        return {"step": self.step, "last": last, "counters": dict(self.counters), "out": str(self.out),
                "trained_steps": self.step - start}

    def _check_loss_settings(self) -> None:
        problem = gather_problem(self.cfg.loss.local_loss, self.cfg.loss.gather_with_grad, self.dist.world_size)
        if problem is None:
            return
        severity, reason = problem
        if severity == "error":  # config alone decides: every rank raises it
            raise ConfigError(reason)
        if self.dist.is_main:
            log.warning("warning: %s", reason)

    def _open_run_folder(self, start: int) -> None:
        """config.yaml and the metrics' files (rank 0)."""
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "config.yaml")
        report_to, run = reporters(self.cfg), self.cfg.run
        wandb = {"project": run.wandb_project, "name": run.name, "config": self.cfg.to_dict()} if "wandb" in report_to else None
        self.metrics = MetricLogger(self.out, tensorboard="tensorboard" in report_to, start_step=start, wandb=wandb)

    # -- one optimisation step -------------------------------------------------------------
    def _train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        """One optimiser step on ``optim.accum_steps`` micro-batches trained as one batch; returns
        the loss terms of that batch, on the device (read only at the log and save steps)."""
        losses = self._backward(micro_batches)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # as open_clip: logit scale clamped at ln(100)
            self.model.logit_scale.clamp_(0, math.log(100))
        return losses

    def _backward(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        """Accumulates the gradient of the loss on the micro-batches as one batch into ``.grad``
        (training/accumulate.py); returns that batch's loss terms."""
        def backward(total):
            (self.scaler.scale(total) if self.scaler else total).backward()

        if len(micro_batches) == 1:
            losses = self._forward_loss(micro_batches[0])
            backward(sum(losses.values()))
            return {k: v.detach() for k, v in losses.items()}
        no_sync = self.net.no_sync if self.dist.enabled else nullcontext
        return backward_as_one_batch(micro_batches, self._forward, self._loss, backward, no_sync=no_sync,
                                     device=self.device)

    def _watch_finite(self, losses: dict[str, torch.Tensor]) -> None:
        """Keeps, on the device, the step and loss terms of the first non-finite loss since the last
        check (:meth:`_checked_terms`): a Python ``if`` on the loss here would wait for the GPU."""
        terms = torch.stack([v.float() for v in losses.values()])
        here = torch.cat([terms.new_full((1,), self.step), terms])  # a fill on the device, no copy
        if self._nonfinite is None:
            self._nonfinite = torch.full_like(here, math.inf)
        first = torch.isinf(self._nonfinite[0]) & ~torch.isfinite(terms.sum())
        self._nonfinite = torch.where(first, here, self._nonfinite)

    def _checked_terms(self, losses: dict[str, torch.Tensor]) -> tuple[dict[str, float], float]:
        """The step's loss terms averaged over ranks (one all-reduce, one read from the device) with
        their sum ``loss``, and the logit scale. A non-finite loss on any rank since the last check
        stops every rank with a :class:`NonFiniteLoss` naming the first step that had one."""
        scale = self.model.logit_scale.detach().exp().float().reshape(1)
        found = torch.isfinite(self._nonfinite[:1]).float()
        values = torch.cat([torch.stack([v.float() for v in losses.values()]), scale, found])
        if self.dist.enabled:
            torch.distributed.all_reduce(values)
            values = values / self.dist.world_size
        *terms, logit_scale, found = values.tolist()
        if found:
            self._raise_non_finite(list(losses))
        terms = dict(zip(losses, terms))
        terms["loss"] = sum(v for k, v in terms.items() if k.endswith("_loss"))
        return terms, logit_scale

    def _raise_non_finite(self, names: list[str]) -> None:
        records = self._nonfinite.unsqueeze(0)
        if self.dist.enabled:  # every rank's first non-finite step, if any; the earliest is named
            gathered = [torch.empty_like(self._nonfinite) for _ in range(self.dist.world_size)]
            torch.distributed.all_gather(gathered, self._nonfinite)
            records = torch.stack(gathered)
        step, *terms = records[records[:, 0].argmin()].tolist()
        detail = ", ".join(f"{k}={v}" for k, v in zip(names, terms))
        seen = f" (found at step {self.step - 1}; the steps in between trained on it)" if step < self.step - 1 else ""
        raise NonFiniteLoss(
            f"non-finite loss at step {int(step)}: {detail}{seen}; nothing was saved after it: last checkpoint in "
            f"{self.ckpt_dir} (resume with --resume latest, maybe with a lower lr)")

    def _account(self, micro_batches: list[dict], failed: Exception | None, waited: float) -> None:
        """Counts the step's samples, unreadable images and truncated texts over all ranks, and takes
        the slowest rank's wait on its loader (one rank waiting holds up every rank's step), in the
        step's one collective: on the host, from the batches' Python counts, so nothing waits on the
        GPU. An error on any rank (``failed``) stops every rank there with that error."""
        keys = ["seen", "bad", "truncated", "texts"] + (["bad_rows", "dropped"] if self.shards else [])
        local = dict.fromkeys(keys, 0)
        bad: list[str] = []
        for batch in micro_batches:
            local["seen"] += len(batch["index"]) + len(batch["bad"])
            local["bad"] += len(batch["bad"])
            local["truncated"] += batch["truncated"]
            local["texts"] += batch["num_texts"]
            bad += batch["bad"]
            if self.shards:  # samples a stream left out and replaced (on_bad_row=skip, missing_slot_policy=drop)
                local["bad_rows"] += len(batch["bad_rows"])
                local["dropped"] += len(batch["dropped"])
                for message in (batch["bad_rows"] + batch["dropped"])[: max(0, 5 - self.counters["bad_rows"]
                                                                           - self.counters["dropped"])]:
                    log.warning("left out and replaced: %s", message)
        table = exchange(self.dist, [*local.values(), waited], failed)
        for key, value in zip(keys, table[:, :-1].sum(axis=0)):
            self.counters[key] += int(value)
        self.data_wait = float(table[:, -1].max())
        if table[:, keys.index("bad")].any():  # every rank then holds the same examples and counts: the
            if len(self.bad_examples) < 20:  # check raises on all of them alike
                for found in all_gather_objects(self.dist, bad):
                    self.bad_examples.extend(found[: max(0, 20 - len(self.bad_examples))])
            check_bad_fraction(self.counters["bad"], max(self.counters["seen"], 100),
                               self.cfg.data.max_bad_fraction, self.bad_examples)

    def _save(self) -> None:
        # rank 0 writes; a failed write (a full disk) stops every rank with its error
        ckpt.on_main(lambda: ckpt.save_checkpoint(self.ckpt_dir, self.step, self._state(),
                                                  self.cfg.run.keep_checkpoints), self.dist.is_main)


def train(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False,
          allow_world_size_change: bool = False) -> dict:
    """``resume``: None (a new run; run.out must not hold another run), ``latest`` or a checkpoint path.
    ``overwrite``: delete the run already in run.out (checkpoints, metrics, TensorBoard, model) first.
    ``allow_world_size_change``: ``latest`` may go on over another number of ranks (the global batch changes;
    the epoch's samples not yet trained are re-cut over the new ranks: none repeated, none lost but the
    last part of a global batch)."""
    trainer = Trainer(cfg, resume, overwrite, allow_world_size_change)
    try:
        return trainer.train()
    finally:  # also on error: a process group left behind leaks its sockets or NCCL communicators
        # DDP's reducer holds the process group: it goes first, so that the group is not destroyed a
        # second time when the trainer is freed after destroy_process_group (gloo's destructor then
        # waits on a lock forever, now and then, and the rank never exits)
        trainer.net = None
        gc.collect()
        if trainer.dist.owns_group:
            cleanup()


def cache_texts(cfg: TrainConfig) -> dict:
    """Fills the locked text trunk's feature cache with ``cfg``'s training texts, as the start of
    :func:`train` does, and stops (under torchrun the ranks share the work). Returns the cache
    folder and the fill's counts (see :func:`holiclip.training.text_cache.fill_text_cache`)."""
    if cfg.data.text_cache != "auto":
        raise ValueError(f"data.text_cache={cfg.data.text_cache}: no text cache to fill")
    trainer = Trainer(cfg)
    try:
        trainer._build()
    finally:
        if trainer.dist.owns_group:
            cleanup()
    if trainer.text_cache is None:
        raise ValueError(f"no text cache for this config: it is used with a locked text trunk "
                         f"(model.lock_text=true) and data.text_cache=auto (model.lock_text="
                         f"{cfg.model.lock_text}, data.text_cache={cfg.data.text_cache})")
    return {"path": str(trainer.text_cache.path), **trainer.text_cache_filled}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [row for _, row in jsonl_rows(path)] if path.exists() else []
