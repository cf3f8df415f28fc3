"""Backend for Hugging Face transformers image-text-to-text models.

The generic ``AutoProcessor`` + ``AutoModelForImageTextToText`` path, as used by LLaVA,
Qwen2-VL / Qwen2.5-VL, InternVL (``-hf`` checkpoints), Gemma 3 and others: the processor's
chat template builds each prompt (image part first, then the perspective's prompt), the batch
is left-padded and decoded greedily by default. Only the newly generated tokens are decoded.

Several GPUs: launch with ``torchrun --nproc-per-node N -m holiclip.cli.caption run ...``; each
rank reads RANK / WORLD_SIZE / LOCAL_RANK from the environment, takes its shard of the images
and its own GPU (no process group is needed: ranks never talk to each other).
"""
from __future__ import annotations

import asyncio
import io
from typing import Sequence

from holiclip.io import torchrun_env

from .base import CaptionError, CaptionRequest, CaptionResult


def _pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{torchrun_env().local_rank % torch.cuda.device_count()}"
    return "cpu"


def _pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # half precision on CPU is slow or unsupported
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16") from None


class HFBackend:
    needs_image_bytes = True

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        concurrency: int = 1,
        temperature: float = 0.0,
        trust_remote_code: bool = False,
        hf_model=None,
        processor=None,
    ):
        """``model``: a local folder or hub name. ``hf_model``/``processor``: already-built
        objects (tests, notebooks); then ``model`` is only the name recorded in rows."""
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.concurrency = max(1, int(concurrency))  # >1 only overlaps decoding with the GPU
        self.temperature = temperature
        self.device = _pick_device(device)
        if hf_model is None or processor is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            torch_dtype = _pick_dtype(dtype, self.device)
            processor = processor or AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
            hf_model = hf_model or AutoModelForImageTextToText.from_pretrained(
                model, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
        self.processor = processor
        self.hf_model = hf_model.to(self.device).eval()
        tok = getattr(processor, "tokenizer", None)
        if tok is None:
            raise CaptionError(f"{model}: the processor has no tokenizer")
        tok.padding_side = "left"  # decoder-only generation continues from the right end
        if getattr(processor, "chat_template", None) is None and getattr(tok, "chat_template", None) is None:
            raise CaptionError(f"{model}: the processor has no chat template; cannot build prompts")
        self._tok = tok
        eos = getattr(self.hf_model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tok.eos_token_id
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else (min(self._eos) if self._eos else 0)
        self.retries = 0

    async def aclose(self) -> None:
        return None

    async def generate(self, batch: Sequence[CaptionRequest]) -> list:
        return await asyncio.to_thread(self._generate_sync, list(batch))

    def _prompt(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _generate_sync(self, batch: list[CaptionRequest]) -> list:
        import torch
        from PIL import Image

        results: list = [None] * len(batch)
        images, texts, idx = [], [], []
        for i, req in enumerate(batch):  # a broken image fails alone, not its batch
            try:
                with Image.open(io.BytesIO(req.data)) as im:
                    images.append(im.convert("RGB"))
                texts.append(self._prompt(req.prompt))
                idx.append(i)
            except Exception as err:  # PIL raises several types for bad files
                results[i] = CaptionError(f"{req.image}: cannot decode image: {err}")
        if not idx:
            return results
        max_new = max(batch[i].max_new_tokens for i in idx)
        gen_kwargs = {"max_new_tokens": max_new, "pad_token_id": self._pad}
        if self.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=self.temperature)
        else:
            gen_kwargs.update(do_sample=False)
        try:
            inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
            inputs = inputs.to(self.device)
            dtype = next(self.hf_model.parameters()).dtype
            if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.inference_mode():
                out = self.hf_model.generate(**inputs, **gen_kwargs)
        except Exception as err:  # e.g. out of memory: the whole batch fails and is retried next run
            for i in idx:
                results[i] = CaptionError(f"generation failed: {type(err).__name__}: {err}")
            return results
        new_tokens = out[:, inputs["input_ids"].shape[1]:].tolist()
        for row, i in zip(new_tokens, idx):
            limit = batch[i].max_new_tokens
            cut = next((k for k, t in enumerate(row) if t in self._eos), None)
            if cut is not None and cut < limit:
                ids, reason = row[:cut], "stop"
            else:
                ids = row[:limit]
                reason = "length" if len(ids) >= limit else "stop"
            text = self._tok.decode(ids, skip_special_tokens=True).strip()
            results[i] = CaptionResult(text=text, finish_reason=reason)
        return results
