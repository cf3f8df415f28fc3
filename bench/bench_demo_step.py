"""Cost of one demo training step per variant (what `make demo` spends its time on).

The demo's model: holi-small-minilm (4-layer ViT, width 192, patch 8, 64 px) with the MiniLM
text trunk frozen and cached, so a step is the image tower + text projection + loss + AdamW.
Prints seconds per step for each variant at the demo's batch size, with 2 threads in one
process and with 1 thread (two such processes can run side by side on 2 cores).

    python bench/bench_demo_step.py [--batch 128] [--steps 6]
"""
from __future__ import annotations

import argparse
import time

import torch

import holiclip
from holiclip.loss import M2MLoss

SLOTS = 5
VARIANTS = {  # name: (encoder, branches, mlp_layers, fused_weight)
    "clip": ("cls", 1, 1, 0.0, 1),
    "o2m": ("cls", 1, 1, 0.0, SLOTS),
    "holistic_cls": ("cls", SLOTS, 1, 0.0, SLOTS),
    "holistic_mlp L=1": ("mlp", SLOTS, 1, 0.0, SLOTS),
    "holistic_mlp L=2": ("mlp", SLOTS, 2, 0.0, SLOTS),
    "holistic_hybrid": ("cls", SLOTS, 1, 0.5, SLOTS),
}


def step_time(name: str, batch: int, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder, h, layers, fused, m = VARIANTS[name]
    model = holiclip.create_model("holi-small-minilm", encoder=encoder, branches=[f"b{i}" for i in range(h)],
                                  mlp_layers=layers, lock_text=True, pretrained_text=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = M2MLoss(fused_weight=fused)
    images, trunk = torch.randn(batch, 3, 64, 64), torch.randn(batch, m, 384)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(images=images, text_trunk_features=trunk)
        loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]  # median, first step is warm-up


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    print(f"| variant | s/step, 2 threads | s/step, 1 thread | vs clip (2 threads) |\n|---|---|---|---|")
    base = None
    for name in VARIANTS:
        two = step_time(name, args.batch, args.steps, 2)
        one = step_time(name, args.batch, args.steps, 1)
        base = base or two
        print(f"| {name} | {two:.3f} | {one:.3f} | {two / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
