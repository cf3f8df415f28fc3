"""Install the emoji benchmark's missing sources: Debian packages (apt-get, as root or via sudo)
and the held-out artwork (``npm pack``, SVGs and licences unpacked into the source cache).

Run by ``scripts/install_emoji_sources.sh`` (``make emoji-sources``); idempotent. What to
install and where it goes come from the library's ``sources`` module, loaded from its file
with the checkout's ``src/`` on the path (``sources`` and ``holiclip.io``, which says where the
cache root is, need only the standard library), so this works before the virtualenv exists.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
SOURCES_PY = SRC / "holiclip" / "benchmarks" / "emoji" / "data" / "sources.py"


def _load_sources():
    sys.path.insert(0, str(SRC))  # holiclip.io (stdlib only): the cache root
    spec = importlib.util.spec_from_file_location("holiclip_emoji_sources", SOURCES_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


S = _load_sources()


def run(cmd: list[str], log, quiet: bool = False) -> bool:
    log("$ " + " ".join(cmd))
    try:
        out = subprocess.run(cmd, timeout=900, stdout=subprocess.DEVNULL if quiet else None)
        return out.returncode == 0
    except (OSError, subprocess.SubprocessError) as err:
        log(f"  failed: {err}")
        return False


def apt_install(packages: list[str], log) -> None:
    if not packages or not shutil.which("apt-get"):
        return
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        log("not root and no sudo: cannot apt-get install " + " ".join(packages))
        return
    env_cmd = prefix + ["env", "DEBIAN_FRONTEND=noninteractive"]
    # apt-get needs fresh lists on a new machine; update once, then install.
    run(env_cmd + ["apt-get", "update", "-qq"], log)
    run(env_cmd + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], log)


def safe_members(tar: tarfile.TarFile, wanted_dir: str):
    """Only regular files under ``package/<wanted_dir>`` (plus licence files), no escapes."""
    prefix = "package/" if wanted_dir in (".", "") else f"package/{wanted_dir.strip('/')}/"
    for m in tar.getmembers():
        name = m.name
        if not m.isfile() or ".." in Path(name).parts or name.startswith("/"):
            continue
        base = name.split("/")[-1].lower()
        if name.startswith(prefix) and name.endswith(".svg") and name[len(prefix):].count("/") == 0:
            yield m, "svg/" + name[len(prefix):]
        elif name.count("/") == 1 and (base.startswith("licen") or base == "package.json"):
            yield m, base


def npm_fetch(style, cache_dir: Path, log) -> None:
    if not shutil.which("npm"):
        log("npm not found: apt-get install -y npm")
        return
    target = S.artwork_dir(cache_dir, style)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        if not run(["npm", "pack", f"{style.npm}@{style.npm_version}", "--silent",
                     "--pack-destination", tmp], log, quiet=True):
            return
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if tgz is None:
            log(f"npm pack {style.npm} produced no tarball")
            return
        staging = Path(tmp) / "unpacked"
        (staging / "svg").mkdir(parents=True)
        with tarfile.open(tgz, "r:gz") as tar:
            for member, rel in safe_members(tar, style.svg_dir or "."):
                data = tar.extractfile(member)
                if data is not None:
                    (staging / rel).write_bytes(data.read())
        n = len(list((staging / "svg").glob("*.svg")))
        if n == 0:
            log(f"{tgz.name} holds no SVGs under {style.svg_dir}")
            return
        version = style.npm_version
        if (staging / "package.json").is_file():
            version = json.loads((staging / "package.json").read_text()).get("version", version)
        (staging / ".complete").write_text(f"{version}\n")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))
        log(f"{style.name}: {n} SVGs in {target}/svg")


def fetch_missing(cache_dir: str | None, styles: tuple[str, ...], log=print):
    """Install what is missing; returns what is there afterwards."""
    src = S.find_sources(cache_dir)
    apt_install([package for _, package in S.missing_packages(src, styles)], log)
    for style in S.missing_artwork(src, styles):
        npm_fetch(style, src.cache_dir, log)
    return S.find_sources(src.cache_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Install the emoji benchmark's missing sources.")
    p.add_argument("--cache-dir", default=None, help="default: $HOLICLIP_EMOJI_SOURCES, else emoji-sources in the cache root "
                   "($HOLICLIP_CACHE, else $XDG_CACHE_HOME/holiclip, else ~/.cache/holiclip)")
    p.add_argument("--styles", default="twemoji,openmoji", help="held-out artwork styles to fetch")
    p.add_argument("--check", action="store_true", help="only report, install nothing")
    args = p.parse_args(argv)
    styles = tuple(s for s in args.styles.split(",") if s)
    unknown = [s for s in styles if s not in S.STYLES]
    if unknown:
        print(f"unknown artwork style(s) {unknown}; known: {sorted(S.STYLES)}", file=sys.stderr)
        return 2
    if not args.check:
        fetch_missing(args.cache_dir, styles)
    try:
        src = S.require_sources(args.cache_dir, styles)
    except S.MissingSourcesError as err:
        print(err, file=sys.stderr)
        return 1
    print(json.dumps(src.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
