"""Core benchmark: training throughput and M2M loss speed, on CPU.

    .venv/bin/python bench/bench_core.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/bench_core.py --quick    # fewer repeats
    .venv/bin/python bench/bench_core.py --clock cpu   # on a busy shared machine
    .venv/bin/python bench/bench_core.py --profile cls   # torch.profiler table of one setting

Measures, in one process, with the settings interleaved (round-robin, order rotated per
repeat) so that machine noise hits all of them alike; medians over repeats:
1. holiclip H = M = 1 (HolisticCLIP + M2MLoss) against open_clip's own CLIP + ClipLoss on the
   same architecture and weights: images/s of forward + backward + AdamW step (target >= 0.97).
2. Psi_CLS and Psi_MLP at H = M = 5 against O2M (H = 1, M = 5): cost ratios (target for
   Psi_CLS <= 1.1x; Psi_MLP runs its last L blocks H times, so it costs more by design).
   The M = 5 texts dominate a step on this config, so the image tower alone is timed too.
3. The M2M loss (forward + backward) at H = M = 5, D = 512, B = 256..1024, batched (holiclip)
   against a per-slot Python loop (the research code's style).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import holiclip  # noqa: F401  (torchvision shim first)
import open_clip

# holi-small's vision tower (4 x 192, /8 at 64 px) with its built-in 4 x 256 text transformer
ARCH = "holi-small"
SLOTS = ("web", "detail", "background", "main", "style")
# wall clock by default; --clock cpu: this thread's CPU time with 1 torch thread, which other
# processes on a shared machine barely disturb (2-thread wall times there swing by 2x)
CLOCK = time.perf_counter


# -- models and steps ------------------------------------------------------------------------------
def open_clip_model() -> open_clip.CLIP:
    cfg = holiclip.get_model_config(ARCH)
    cfg.pop("holistic", None)
    return open_clip.CLIP(**cfg)


def holiclip_model(encoder: str, branches: int, weights: str) -> holiclip.HolisticCLIP:
    """H branches initialised from the same open_clip weights file (the pretrained copy-in path)."""
    names = SLOTS[:branches] if branches > 1 else ("global",)
    return holiclip.create_model(ARCH, encoder, names, pretrained=weights)


def batch_for(batch: int, slots: int, seed: int = 0):
    cfg = holiclip.get_model_config(ARCH)
    g = torch.Generator().manual_seed(seed)
    size = cfg["vision_cfg"]["image_size"]
    ctx, vocab = cfg["text_cfg"]["context_length"], cfg["text_cfg"]["vocab_size"]
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.randint(1, vocab - 1, (batch, slots, ctx), generator=g)
    lengths = torch.randint(5, ctx, (batch, slots), generator=g)
    positions = torch.arange(ctx)
    tokens[positions.expand(batch, slots, ctx) > lengths[..., None]] = 0
    tokens.scatter_(-1, lengths[..., None], vocab - 1)  # end-of-text token (the largest id)
    return images, tokens


class Step:
    """One training step (forward + backward + AdamW) of a model/loss pair."""

    def __init__(self, label: str, model, loss_fn, images, tokens, holistic: bool):
        self.label, self.model, self.loss_fn = label, model.train(), loss_fn
        self.images, self.tokens, self.holistic = images, tokens, holistic
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.2)
        self.batch = images.shape[0]

    def __call__(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        if self.holistic:
            out = self.model(self.images, self.tokens)
            loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        else:  # open_clip: (B, 1, L) tokens
            image, text, scale = self.model(self.images, self.tokens[:, 0])
            loss = self.loss_fn(image, text, scale)
        loss.backward()
        self.opt.step()
        return loss.item()


class VisionStep:
    """Forward + backward of the image tower alone (where the branch designs differ)."""

    def __init__(self, model, images):
        self.model, self.images = model, images

    def __call__(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.model.encode_image(self.images, normalize=True).sum().backward()


def interleaved(fns: dict, repeats: int, inner: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured round-robin with a rotating order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            t0 = CLOCK()
            for _ in range(inner):
                fns[k]()
            times[k].append((CLOCK() - t0) / inner)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a[i] / b[i] (paired: same moment, same machine load)."""
    return statistics.median(x / y for x, y in zip(a, b))


# -- M2M loss: batched vs per-slot loop ---------------------------------------------------------------
def loop_m2m(image: torch.Tensor, text: torch.Tensor, scale) -> torch.Tensor:
    """The research code's style: one branch/slot at a time in Python."""
    total = 0.0
    labels = torch.arange(image.shape[0])
    for m in range(text.shape[1]):
        logits = scale * image[:, m] @ text[:, m].T
        total = total + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return total / text.shape[1]


def loss_bench(batches, repeats: int, inner: int) -> list[dict]:
    rows = []
    m2m = holiclip.M2MLoss()
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        image = F.normalize(torch.randn(batch, 5, 512, generator=g), dim=-1).requires_grad_(True)
        text = F.normalize(torch.randn(batch, 5, 512, generator=g), dim=-1).requires_grad_(True)
        scale = torch.tensor(1 / 0.07, requires_grad=True)

        def run(fn):
            def call():
                image.grad = text.grad = scale.grad = None
                fn(image, text, scale).backward()
            return call

        a, b = m2m(image, text, scale), loop_m2m(image, text, scale)
        assert torch.allclose(a, b, rtol=1e-5), (a, b)  # same loss, or the timing means nothing
        t = interleaved({"batched": run(m2m), "loop": run(loop_m2m)}, repeats, inner, warmup=2)
        rows.append({
            "batch": batch,
            "batched_ms": 1e3 * statistics.median(t["batched"]),
            "loop_ms": 1e3 * statistics.median(t["loop"]),
            "speedup": median_ratio(t["loop"], t["batched"]),
        })
    return rows


# -- main ----------------------------------------------------------------------------------------------
def build_steps(batch: int, which: set[str]) -> dict[str, Step]:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = open_clip_model().state_dict()
    weights = os.path.join(tempfile.mkdtemp(prefix="holiclip-bench-"), "open_clip.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, weights)
    steps = {}
    images, tokens1 = batch_for(batch, 1)
    _, tokens5 = batch_for(batch, 5)
    if "h1" in which:
        ref = open_clip_model()
        ref.load_state_dict(state)
        steps["open_clip H=M=1"] = Step("open_clip", ref, open_clip.ClipLoss(), images, tokens1, holistic=False)
        steps["holiclip H=M=1"] = Step("holiclip", holiclip_model("cls", 1, weights), holiclip.M2MLoss(),
                                       images, tokens1, holistic=True)
    if "h5" in which:
        steps["O2M H=1 M=5"] = Step("o2m", holiclip_model("cls", 1, weights), holiclip.M2MLoss(),
                                    images, tokens5, holistic=True)
        steps["Psi_CLS H=M=5"] = Step("cls", holiclip_model("cls", 5, weights), holiclip.M2MLoss(),
                                      images, tokens5, holistic=True)
        steps["Psi_MLP H=M=5"] = Step("mlp", holiclip_model("mlp", 5, weights), holiclip.M2MLoss(),
                                      images, tokens5, holistic=True)
    return steps


def profile(name: str, batch: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    keys = {"open_clip": "open_clip H=M=1", "h1": "holiclip H=M=1", "o2m": "O2M H=1 M=5",
            "cls": "Psi_CLS H=M=5", "mlp": "Psi_MLP H=M=5"}
    steps = build_steps(batch, {"h1"} if name in ("open_clip", "h1") else {"h5"})
    step = steps[keys[name]]
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=1, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--loss-batches", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: per-thread CPU time, 1 thread (for a machine shared with other jobs)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 2 steps per block")
    parser.add_argument("--profile", choices=["open_clip", "h1", "o2m", "cls", "mlp"])
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        args.threads, CLOCK = 1, time.thread_time
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 3
    if args.profile:
        profile(args.profile, args.batch)
        return

    cfg = holiclip.get_model_config(ARCH)
    print(f"# holiclip core benchmark: torch {torch.__version__}, open_clip {open_clip.__version__}, "
          f"{args.threads} threads, {args.clock} clock, {ARCH} ({holiclip.models.registry.config_summary(cfg)}), "
          f"batch {args.batch}, {args.repeats} repeats x {args.inner} steps, interleaved\n")

    steps = build_steps(args.batch, {"h1", "h5"})
    t_h1 = interleaved({k: steps[k] for k in ("open_clip H=M=1", "holiclip H=M=1")},
                       args.repeats, args.inner, args.warmup)
    t_h5 = interleaved({k: steps[k] for k in ("O2M H=1 M=5", "Psi_CLS H=M=5", "Psi_MLP H=M=5")},
                       args.repeats, args.inner, args.warmup)
    t_vis = interleaved({k: VisionStep(steps[k].model, steps[k].images)
                         for k in ("O2M H=1 M=5", "Psi_CLS H=M=5", "Psi_MLP H=M=5")},
                        args.repeats, max(args.inner, 3), args.warmup)

    print("| training step (fwd+bwd+AdamW) | images/s (median) | ms/step | ratio | vs |")
    print("|---|---:|---:|---:|---|")
    ips = {k: args.batch / statistics.median(v) for k, v in {**t_h1, **t_h5}.items()}
    ratio_h1 = median_ratio(t_h1["open_clip H=M=1"], t_h1["holiclip H=M=1"])  # throughput ratio
    rows = [
        ("open_clip H=M=1", None, ""),
        ("holiclip H=M=1", ratio_h1, "open_clip (throughput)"),
        ("O2M H=1 M=5", None, ""),
        ("Psi_CLS H=M=5", median_ratio(t_h5["Psi_CLS H=M=5"], t_h5["O2M H=1 M=5"]), "O2M (cost)"),
        ("Psi_MLP H=M=5", median_ratio(t_h5["Psi_MLP H=M=5"], t_h5["O2M H=1 M=5"]), "O2M (cost)"),
    ]
    times = {**t_h1, **t_h5}
    for key, ratio, vs in rows:
        r = f"{ratio:.3f}" if ratio is not None else ""
        print(f"| {key} | {ips[key]:.1f} | {1e3 * statistics.median(times[key]):.1f} | {r} | {vs} |")

    print("\n| image tower only (fwd+bwd, no text) | images/s (median) | ms | cost vs H=1 |")
    print("|---|---:|---:|---:|")
    for key, label in (("O2M H=1 M=5", "H=1"), ("Psi_CLS H=M=5", "Psi_CLS H=5"), ("Psi_MLP H=M=5", "Psi_MLP H=5")):
        ms = statistics.median(t_vis[key])
        print(f"| {label} | {args.batch / ms:.1f} | {1e3 * ms:.1f} | "
              f"{median_ratio(t_vis[key], t_vis['O2M H=1 M=5']):.3f} |")

    loss_rows = loss_bench(args.loss_batches, args.repeats, 3)
    print("\n| M2M loss fwd+bwd, H=M=5, D=512 | batched ms | per-slot loop ms | speed-up |")
    print("|---|---:|---:|---:|")
    for row in loss_rows:
        print(f"| B={row['batch']} | {row['batched_ms']:.2f} | {row['loop_ms']:.2f} | {row['speedup']:.2f}x |")

    cls_cost = rows[3][1]
    print()
    print(f"target holiclip/open_clip throughput >= 0.97: {ratio_h1:.3f} -> {'met' if ratio_h1 >= 0.97 else 'NOT met'}")
    print(f"target Psi_CLS cost vs O2M <= 1.10x: {cls_cost:.3f}x -> {'met' if cls_cost <= 1.10 else 'NOT met'}")
    print(f"Psi_MLP cost vs O2M (no target; last {len(steps['Psi_MLP H=M=5'].model.visual.transformer.resblocks) - steps['Psi_MLP H=M=5'].model.visual.fork_at} "
          f"blocks run 5x): {rows[4][1]:.3f}x")
    speedups = ", ".join(f"B={r['batch']}: {r['speedup']:.2f}x" for r in loss_rows)
    print(f"M2M loss batched vs per-slot loop: {speedups} -> "
          f"{'faster' if min(r['speedup'] for r in loss_rows) > 1 else 'NOT faster everywhere'}")


if __name__ == "__main__":
    main()
