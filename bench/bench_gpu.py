"""Training throughput on one GPU: holiclip's trainer against open_clip's on the same synthetic shards.

    python bench/bench_gpu.py          # one H100: ViT-B/16, 224 px, batch 256, M = 5 (under 8 minutes)
    python bench/bench_gpu.py --dry    # CPU: a tiny model, tiny shards, 3 steps per run (the test suite's)
    python bench/bench_gpu.py --systems holiclip-h1,open_clip --modes eager --workers 8

Rows: holiclip with H = 1 (one branch, the 5 captions: O2M) and with Psi_CLS H = 5 (a branch per
caption), ``python -m open_clip_train.main`` (its ``main``, called in the measuring process so that
its peak memory is read) with its one caption (the txt member); each eager and compiled
(``run.compile=true`` / ``--torchcompile``), with ``data.workers`` / ``--workers`` 8 and 16. Same
shards (256 px JPEG + txt + json of 5 captions, sizes.json), batch, optimiser (AdamW, lr 5e-4,
wd 0.2, betas 0.9/0.98, eps 1e-6, grad clip 1), bf16 autocast.

Measured over the steps after a warm-up (compiled runs: 2 x workers + 4 steps, so that the batches
the workers made ahead during compilation are used up first), from the trainers' own logs every
``--log-every`` steps: images/s, ``data_wait`` (the share of the step time spent waiting for the
loader; open_clip's ``Data (t)`` over ``Batch (t)``), peak GPU memory
(``torch.cuda.max_memory_allocated``), MFU (training FLOPs per image, 3 x the forward's counted by
``torch.utils.flop_counter`` at batch 1, x images/s over the GPU's dense bf16 peak). Each system and
mode runs in its own process (its worker counts one after the other, so a compiled model's second
run finds inductor's caches warm). Runs that would start past ``--budget`` seconds are listed as
skipped: the whole command stays under it.

open_clip_train's webdataset pipeline needs webdataset 0.2.86 (and pandas), installed once into a side
folder put on its process's path only, as ``bench/bench_data.py`` does (``--baseline-site``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_data import BASELINE_WEBDATASET, SLOTS, baseline_site, write_shards

from holiclip.io import cache_root

SYSTEMS = {  # name: (label, H, M)
    "holiclip-h1": ("holiclip H = 1 (O2M)", 1, 5),
    "holiclip-cls5": ("holiclip Psi_CLS H = 5", 5, 5),
    "open_clip": ("open_clip_train.main", 1, 1),
}
MODES = ("eager", "compile")
# dense bf16 tensor-core peaks (TFLOP/s), matched in this order against torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0))


def settings(dry: bool) -> dict:
    """What a run trains: the real benchmark, or the CPU dry run exercising the same code paths."""
    if dry:
        return {"model": "holi-tiny", "batch": 8, "image_px": 64, "shard_size": 16, "shards": 8, "log_every": 1,
                "warmup": 1, "measure": 2, "workers": [1, 2], "precision": "fp32", "device": "cpu"}
    return {"model": "ViT-B-16", "batch": 256, "image_px": 256, "shard_size": 256, "shards": 80, "log_every": 5,
            "warmup": 10, "measure": 10, "workers": [8, 16], "precision": "bf16", "device": "cuda"}


def warmup_steps(s: dict, mode: str, workers: int) -> int:
    """Steps left out before measuring: compiled runs also drain the 2 batches per worker prefetched
    while compiling; a multiple of the logging interval (the windows the trainers report)."""
    steps = s["warmup"] + (2 * workers + 4 if mode == "compile" and s["device"] == "cuda" else 0)
    return math.ceil(steps / s["log_every"]) * s["log_every"]


# -- FLOPs and peaks ---------------------------------------------------------------------------------------
def train_flops_per_image(system: str, s: dict, h: int, m: int) -> float:
    """3 x the forward FLOPs of one image with its M captions (backward ~ 2 x forward), on CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if system == "open_clip":
        import open_clip

        model = open_clip.create_model(s["oc_model"])
        size, ctx = model.visual.image_size, model.context_length
        size = size[0] if isinstance(size, (tuple, list)) else size
        run = lambda: model(torch.zeros(1, 3, size, size), torch.zeros(1, ctx, dtype=torch.long))  # noqa: E731
    else:
        from holiclip.models.registry import create_model

        model = create_model(s["model"], encoder="cls", branches=["global"] if h == 1 else list(SLOTS[:h]))
        size = model.image_size[0] if isinstance(model.image_size, tuple) else model.image_size
        texts = torch.zeros(1, m, model.context_length, dtype=torch.long)
        run = lambda: model(images=torch.zeros(1, 3, size, size), texts=texts)  # noqa: E731
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        run()
    return 3.0 * counter.get_total_flops()


def peak_flops(override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override * 1e12, f"{override:g} TFLOP/s (--peak-tflops)"
    if not torch.cuda.is_available():
        return None, "no GPU: MFU not computed"
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16"
    return None, f"{name}: peak unknown (give --peak-tflops)"


# -- measuring windows -------------------------------------------------------------------------------------
def summarise(windows: list[tuple[int, int, float, float]], warm: int, log: Path) -> dict:
    """``(first step, steps, seconds, seconds waiting for data)`` windows -> rates over those after ``warm``."""
    kept = [w for w in windows if w[0] > warm]
    steps, seconds, waited = (sum(w[i] for w in kept) for i in (1, 2, 3))
    if not seconds:
        raise RuntimeError(f"{log}: no logged steps after the {warm} warm-up steps ({len(windows)} windows read)")
    return {"steps": steps, "seconds": seconds, "data_wait": waited / seconds, "steps_per_s": steps / seconds}


def holiclip_windows(out: Path, batch: int) -> list[tuple[int, int, float, float]]:
    from holiclip.training.trainer import read_metrics

    rows, windows, last = read_metrics(out), [], 0
    for row in rows:
        steps = row["step"] - last
        seconds = steps * batch / row["samples_per_s"]
        windows.append((last + 1, steps, seconds, row["data_wait"] * seconds))
        last = row["step"]
    return windows


OPEN_CLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\s*\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")


def open_clip_windows(log: Path, batch: int) -> list[tuple[int, int, float, float]]:
    """open_clip logs the mean data and batch time of the steps since its last line."""
    windows, last = [], 0
    for line in log.read_text().splitlines():
        found = OPEN_CLIP_LINE.search(line)
        if found:
            done, data_t, batch_t = int(found.group(1)) // batch, float(found.group(2)), float(found.group(3))
            if done > last:
                windows.append((last + 1, done - last, (done - last) * batch_t, (done - last) * data_t))
                last = done
    return windows


# -- one run, in the measuring process ---------------------------------------------------------------------
def train_holiclip(spec: dict, s: dict, workers: int, out: Path) -> dict:
    from holiclip.training.config import load_config
    from holiclip.training.trainer import train

    h, m = SYSTEMS[spec["system"]][1:]
    warm = warmup_steps(s, spec["mode"], workers)
    steps = warm + s["measure"]
    cfg = load_config(None, [
        f"data.train={spec['pattern']}", f"data.slots=[{','.join(SLOTS[:m])}]", f"model.name={s['model']}",
        "model.encoder=cls", f"model.branches={'[global]' if h == 1 else 'null'}",
        f"optim.batch_size={s['batch']}", f"optim.steps={steps}", "optim.warmup_steps=10", "optim.lr=5e-4",
        f"data.workers={workers}", f"run.compile={'true' if spec['mode'] == 'compile' else 'false'}",
        f"run.out={out}", f"run.log_every={s['log_every']}", f"run.save_every={10 * steps}", "run.progress=false",
        "run.tensorboard=false", f"run.cache_dir={out}/cache", f"run.device={s['device']}",
        f"run.precision={s['precision']}",
    ])
    train(cfg)
    return summarise(holiclip_windows(out, s["batch"]), warm, out / "metrics.jsonl")


def train_open_clip(spec: dict, s: dict, workers: int, out: Path) -> dict:
    import logging

    from open_clip_train.main import main as open_clip_main

    warm = warmup_steps(s, spec["mode"], workers)
    steps = warm + s["measure"]
    argv = [
        "--train-data", spec["pattern"], "--dataset-type", "webdataset", "--train-num-samples", str(steps * s["batch"]),
        "--batch-size", str(s["batch"]), "--epochs", "1", "--workers", str(workers), "--model", s["oc_model"],
        "--precision", "amp_bf16" if s["precision"] == "bf16" else "fp32", "--lr", "5e-4", "--wd", "0.2",
        "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--warmup", "10", "--grad-clip-norm", "1.0",
        "--seed", "0", "--local-loss", "--gather-with-grad", "--log-every-n-steps", str(s["log_every"]),
        "--logs", str(out), "--name", "run", "--save-frequency", "0",
        *(["--torchcompile"] if spec["mode"] == "compile" else []),
    ]
    code = open_clip_main(argv)
    for handler in list(logging.root.handlers):  # its handlers, added per call, would log the next run twice
        logging.root.removeHandler(handler)
    if code not in (None, 0):
        raise RuntimeError(f"open_clip_train.main exited with {code}")
    log = out / "run" / "out.log"
    return summarise(open_clip_windows(log, s["batch"]), warm, log)


def measure(spec: dict) -> dict:
    """The measuring process: each worker count in turn, then the FLOPs per image."""
    import holiclip  # noqa: F401  (installs the torchvision shim before open_clip is imported)
    import torch

    s = {**settings(spec["dry"]), "oc_model": spec["oc_model"]}
    if spec.get("oc_config"):  # the dry run's tiny architecture, registered with open_clip
        import open_clip

        open_clip.add_model_config(spec["oc_config"])
    h, m = SYSTEMS[spec["system"]][1:]
    results = []
    for workers in spec["workers"]:
        if time.time() > spec["deadline"]:
            results.append({"workers": workers, "skipped": "time budget"})
            continue
        out = Path(spec["work"]) / f"{spec['system']}-{spec['mode']}-w{workers}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        run = train_open_clip if spec["system"] == "open_clip" else train_holiclip
        row = run(spec, s, workers, out)
        row.update(workers=workers, wall_s=time.time() - t0,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
        shutil.rmtree(out, ignore_errors=True)  # checkpoints and the saved model: GBs for ViT-B/16
        results.append(row)
    return {"results": results, "flops_per_image": train_flops_per_image(spec["system"], s, h, m)}


def child(spec: dict, site: str | None, log: Path) -> dict:
    """Runs :func:`measure` in a fresh process; its output goes to ``log``, named on failure."""
    result = Path(spec["work"]) / f"{spec['system']}-{spec['mode']}.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if site:
        env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if spec["dry"]:
        env["CUDA_VISIBLE_DEVICES"] = ""  # on CPU even where a GPU is (open_clip_train takes one when it sees one)
        if spec["mode"] == "compile":
            env["TORCH_COMPILE_DISABLE"] = "1"  # the flags and code paths, not minutes of inductor on a CPU
    cmd = [sys.executable, __file__, "--child", json.dumps({**spec, "result": str(result)})]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{spec['system']} {spec['mode']} failed (exit {proc.returncode}); end of {log}:\n{tail}")
    return json.loads(result.read_text())


# -- the table ----------------------------------------------------------------------------------------------
def table(measured: dict, peak: float | None, batch: int) -> list[str]:
    lines = ["| system | H | M | mode | workers | images/s | vs open_clip | data_wait | peak GiB | MFU | "
             "GFLOP / image (train) | run s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (system, mode), got in measured.items():
        label, h, m = SYSTEMS[system]
        for r in got["results"]:
            w = r["workers"]
            if "skipped" in r:
                lines.append(f"| {label} | {h} | {m} | {mode} | {w} | skipped ({r['skipped']}) | | | | | | |")
                continue
            rate = r["steps_per_s"] * batch
            base = next((b for b in measured.get(("open_clip", mode), {}).get("results", [])
                         if b["workers"] == w and "steps_per_s" in b), None)
            vs = f"{rate / (base['steps_per_s'] * batch):.2f}x" if base else "-"
            mfu = f"{100 * rate * got['flops_per_image'] / peak:.1f}%" if peak else "-"
            mem = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
            lines.append(f"| {label} | {h} | {m} | {mode} | {w} | {rate:.0f} | {vs} | {100 * r['data_wait']:.1f}% | "
                         f"{mem} | {mfu} | {got['flops_per_image'] / 1e9:.3g} | {r['wall_s']:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU: tiny model and shards, a few steps per run")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    ap.add_argument("--modes", default=",".join(MODES), help="eager, compile or both")
    ap.add_argument("--workers", default=None, help="data workers per run, a comma list (default 8,16; dry 1,2)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds: runs that would start later are skipped")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--work-dir", default=None, help="where shards and runs go (default: a temporary folder)")
    ap.add_argument("--baseline-site", default=str(cache_root() / "bench-webdataset-0.2.86"),
                    help=f"folder with {BASELINE_WEBDATASET} for open_clip_train's pipeline (filled if empty)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        Path(spec["result"]).write_text(json.dumps(measure(spec)))
        return
    start = time.time()
    s = settings(args.dry)
    systems = [x for x in args.systems.split(",") if x]
    modes = [x for x in args.modes.split(",") if x]
    unknown = sorted(set(systems) - set(SYSTEMS)) + sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown --systems / --modes: {', '.join(unknown)}")
    workers = [int(w) for w in args.workers.split(",")] if args.workers else s["workers"]
    if not args.dry:
        import torch

        if not torch.cuda.is_available():  # not an error: `make bench` runs every script on any machine
            print("# no GPU here: nothing measured (bench_gpu.py measures on one; --dry runs its code paths on CPU)")
            return
    site = baseline_site(Path(args.baseline_site).resolve()) if "open_clip" in systems else None
    peak, peak_text = peak_flops(args.peak_tflops) if not args.dry else (args.peak_tflops and args.peak_tflops * 1e12,
                                                                            "dry run on CPU")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        t0 = time.time()
        pattern = write_shards(work / "shards", s["shards"] * s["shard_size"], s["shard_size"], s["image_px"])
        oc_model, oc_config = s["model"], None
        if args.dry:  # open_clip's registry gets the tiny architecture (without holiclip's own section)
            from holiclip.models.registry import get_model_config

            oc_model, oc_config = "bench-tiny", work / "bench-tiny.json"
            config = get_model_config(s["model"])
            config.pop("holistic", None)
            oc_config.write_text(json.dumps(config))
        print(f"# {s['model']}, batch {s['batch']}, {s['shards']} shards of {s['shard_size']} ({s['image_px']} px JPEG, "
              f"{len(SLOTS)} captions), written in {time.time() - t0:.0f} s; {peak_text}", flush=True)
        measured = {}
        for mode in modes:  # eager first: the budget cuts compiled runs first
            for system in sorted(systems, key=lambda x: x != "open_clip"):  # the baseline of each mode first
                spec = {"system": system, "mode": mode, "workers": workers, "pattern": pattern, "work": str(work),
                        "dry": args.dry, "deadline": start + args.budget, "oc_model": oc_model,
                        "oc_config": str(oc_config) if oc_config else None}
                t1 = time.time()
                measured[system, mode] = child(spec, site if system == "open_clip" else None,
                                               work / f"{system}-{mode}.log")
                print(f"# {system} {mode}: {time.time() - t1:.0f} s", flush=True)
        print()
        print("\n".join(table(measured, peak, s["batch"])))
        print(f"\n{time.time() - start:.0f} s in all. Targets: holiclip H = 1 >= 1.0x open_clip_train, Psi_CLS H = 5 "
              f">= 0.9x, data_wait < 5% at the recommended data.workers.")


if __name__ == "__main__":
    main()
