"""Accumulation with cached features (optim.accum_steps=k) against one batch of k x B:
peak memory and time of one optimiser step.

Both train on the same k x B samples with the same loss and gradients (tests/training/
test_accumulation.py); accumulation keeps only one micro-batch's activations alive (plus the
k x B features) and pays k extra forwards without gradients. A third row, one micro-batch of B
alone, is the memory accumulation should come close to.

The model is the demo's, holi-small-minilm (ViT 4 x 192 at 64 px, patch 8) with the MiniLM
trunk frozen and its features cached (random trunk features stand in), H = M = 5; with
``--model holi-small`` its own text transformer (4 x 256, 64 tokens) trains too, on random
tokens. The step is the trainer's: forward, M2M loss, backward (through
``holiclip.training.accumulate.backward_as_one_batch`` for k > 1), grad clipping, AdamW. Each
row runs in a fresh process. Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed
steps (after a warm-up step); on CPU the peak RSS of the process (VmHWM) minus its RSS before
the first step (model, optimizer and inputs built), so it includes AdamW's state and the
gradients (the same in every row) besides the activations.

    python bench/bench_accum.py                      # B = 32, k = 4, 3 timed steps
    python bench/bench_accum.py --model holi-small --batch 8
    python bench/bench_accum.py --batch 16 --accum 4 --steps 2 --device cuda
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

SLOTS = 5


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run(model_name: str, batch: int, accum: int, steps: int, device: str, threads: int) -> dict:
    """One configuration in this process: ``accum`` micro-batches of ``batch`` per step."""
    import holiclip
    from holiclip.loss import M2MLoss
    from holiclip.training.accumulate import backward_as_one_batch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cached = model_name.endswith("minilm")  # a frozen HF trunk: the trainer feeds its cached features
    model = holiclip.create_model(model_name, branches=[f"b{i}" for i in range(SLOTS)], lock_text=cached,
                                  pretrained_text=False).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = M2MLoss()
    size = model.image_size[0] if isinstance(model.image_size, tuple) else model.image_size
    g = torch.Generator().manual_seed(1)
    if cached:
        width = model.clip.text.transformer.config.hidden_size
        text = {"text_trunk_features": lambda: torch.randn(batch, SLOTS, width, generator=g)}
    else:
        text = {"texts": lambda: torch.randint(1, 49000, (batch, SLOTS, model.context_length), generator=g)}
    micro = [{"images": torch.randn(batch, 3, size, size, generator=g).to(device),
              **{k: make().to(device) for k, make in text.items()}} for _ in range(accum)]

    def forward(b):
        return model(**b)

    def loss(out):
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"], output_dict=True)

    def step():
        if accum == 1:
            sum(loss(forward(micro[0])).values()).backward()
        else:
            backward_as_one_batch(micro, forward, loss, lambda total: total.backward(), device=device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    before_kib = 0 if cuda else _status_kib("VmRSS")
    step()  # warm-up (AdamW's state is allocated here)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        peak_mib, step_mib = peak / 2**20, (peak - before) / 2**20
    else:
        peak = _status_kib("VmHWM")
        peak_mib, step_mib = peak / 1024, (peak - before_kib) / 1024
    return {"peak_mib": peak_mib, "step_mib": step_mib, "s_per_step": sorted(times)[len(times) // 2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="holi-small-minilm")
    p.add_argument("--batch", type=int, default=32, help="micro-batch B")
    p.add_argument("--accum", type=int, default=4, help="k")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (median reported)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.worker:
        batch, accum = map(int, args.worker.split(","))
        print(json.dumps(run(args.model, batch, accum, args.steps, device, args.threads)))
        return
    b, k = args.batch, args.accum
    rows = {
        f"one batch of {k}B = {k * b} (baseline)": (k * b, 1),
        f"accumulation k = {k} x B = {b}": (b, k),
        f"one micro-batch of B = {b} (memory floor)": (b, 1),
    }
    cuda = device.startswith("cuda")
    memory = "peak allocated" if cuda else "peak RSS"
    floor = "allocated after warm-up" if cuda else "RSS before the first step"
    print(f"{args.model}, H = M = {SLOTS}, {device}, {args.threads} threads; {memory}; "
          f"step memory = peak minus {floor}")
    print(f"| run | samples/step | {memory} MiB | step memory MiB | vs baseline | s/step | vs baseline |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, (batch, accum) in rows.items():
        cmd = [sys.executable, __file__, "--worker", f"{batch},{accum}", "--model", args.model, "--steps",
               str(args.steps), "--device", device, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name}: {proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        base = base or r
        print(f"| {name} | {batch * accum} | {r['peak_mib']:.0f} | {r['step_mib']:.0f} | "
              f"{r['step_mib'] / base['step_mib']:.2f}x | {r['s_per_step']:.2f} | "
              f"{r['s_per_step'] / base['s_per_step']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
