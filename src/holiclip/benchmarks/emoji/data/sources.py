"""Find and version the installed raw sources of the emoji benchmark.

Sources (all from the package registries this project may use):

* Noto Color Emoji font (Debian ``fonts-noto-color-emoji``): the training artwork.
* ``emoji-test.txt`` (Debian ``unicode-data``): names, groups and subgroups.
* CLDR English annotations (Debian ``unicode-cldr-core``): keywords and spoken names.
* Held-out artwork, fetched with ``npm pack`` into a cache folder: ``@twemoji/svg``
  (flat vector, CC-BY 4.0) and ``openmoji`` (outlined flat, CC-BY-SA 4.0).

``emoji-datasource-google`` is *not* a held-out style: it is Noto's own artwork, so a
"held-out" test on it would share artwork with training. ``emoji-datasource-twitter`` is
twemoji's artwork again as 64 px PNG; the SVG package covers it at any size. Apple's
images are not licensed for this use and are never fetched.

Installing them (apt-get, ``npm pack``) is ``make emoji-sources``, i.e.
``scripts/install_emoji_sources.sh``; this module only looks. It uses only the standard
library, so that script can load it (for the style table and the search paths) before the
virtualenv exists.
"""
from __future__ import annotations

import ctypes.util
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from holiclip.io import cache_root

# Debian paths; the first existing one wins.
NOTO_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
)
EMOJI_TEST_PATHS = ("/usr/share/unicode/emoji/emoji-test.txt",)
CLDR_ANNOTATION_PATHS = (
    "/usr/share/unicode/cldr/common/annotations/en.xml",
    "/usr/share/unicode/cldr/common/annotationsDerived/en.xml",
)

APT_PACKAGES = {
    "noto": "fonts-noto-color-emoji",
    "emoji_test": "unicode-data",
    "cldr": "unicode-cldr-core",
}


@dataclass(frozen=True)
class ArtworkStyle:
    """One artwork style: where its images come from and what it may be used for."""

    name: str
    family: str  # artwork lineage; a held-out style must not share it with training
    kind: str  # "font" or "svg"
    npm: str | None  # npm package (pinned version) for svg styles
    npm_version: str | None
    svg_dir: str | None  # folder inside the npm package holding <codepoints>.svg
    upper_hex: bool  # file names in upper-case hex
    keep_fe0f: bool  # whether file names keep U+FE0F in single-emoji names
    licence: str
    attribution: str


STYLES: dict[str, ArtworkStyle] = {
    "noto": ArtworkStyle(
        "noto", "google-noto", "font", None, None, None, False, False,
        "SIL Open Font License 1.1 (font); Apache-2.0 (artwork sources)",
        "Noto Color Emoji, Google, via Debian fonts-noto-color-emoji",
    ),
    "twemoji": ArtworkStyle(
        "twemoji", "twitter-twemoji", "svg", "@twemoji/svg", "15.0.0", ".", False, False,
        "CC-BY 4.0 (graphics)",
        "Twemoji graphics by Twitter, Inc. and other contributors, CC-BY 4.0 (npm @twemoji/svg)",
    ),
    "openmoji": ArtworkStyle(
        "openmoji", "openmoji", "svg", "openmoji", "17.0.0", "color/svg", True, False,
        "CC-BY-SA 4.0 (derived images must stay CC-BY-SA)",
        "OpenMoji, the open-source emoji and icon project, CC-BY-SA 4.0 (npm openmoji)",
    ),
}


class MissingSourcesError(RuntimeError):
    """Raised when a source is missing; ``commands`` are the exact installs needed."""

    def __init__(self, missing: list[str], commands: list[str]):
        self.missing = missing
        self.commands = commands
        lines = ["emoji benchmark sources missing: " + ", ".join(missing),
                 "install them with `make emoji-sources` (scripts/install_emoji_sources.sh), or by hand:"]
        lines += ["  " + c for c in commands]
        super().__init__("\n".join(lines))


@dataclass
class Sources:
    """What was found: file paths, artwork folders and version strings."""

    cache_dir: Path
    noto_font: Path | None = None
    emoji_test: Path | None = None
    cldr: list[Path] = field(default_factory=list)
    art_dirs: dict[str, Path] = field(default_factory=dict)  # svg style -> folder of svgs
    versions: dict[str, str] = field(default_factory=dict)

    def has_style(self, style: str) -> bool:
        return self.noto_font is not None if style == "noto" else style in self.art_dirs

    def summary(self) -> dict:
        return {
            "noto_font": str(self.noto_font) if self.noto_font else None,
            "emoji_test": str(self.emoji_test) if self.emoji_test else None,
            "cldr": [str(p) for p in self.cldr],
            "art_dirs": {k: str(v) for k, v in self.art_dirs.items()},
            "versions": dict(self.versions),
        }


def default_cache_dir() -> Path:
    """``$HOLICLIP_EMOJI_SOURCES``, else ``emoji-sources`` in holiclip's cache root
    (:func:`holiclip.io.cache_root`), where ``make emoji-sources`` installs them; a checkout's
    ``.cache/emoji-sources``, where earlier versions installed them, is still read when only it exists."""
    env = os.environ.get("HOLICLIP_EMOJI_SOURCES")
    if env:
        return Path(env)
    cached = cache_root() / "emoji-sources"
    repo = Path(__file__).resolve().parents[5]  # src/holiclip/benchmarks/emoji/data/sources.py -> checkout
    legacy = repo / ".cache" / "emoji-sources"
    return legacy if not cached.exists() and (repo / "pyproject.toml").is_file() and legacy.is_dir() else cached


def _first(paths) -> Path | None:
    return next((Path(p) for p in paths if Path(p).is_file()), None)


def _dpkg_version(package: str) -> str | None:
    if not shutil.which("dpkg-query"):
        return None
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def artwork_dir(cache_dir: Path, style: ArtworkStyle) -> Path:
    """Where ``make emoji-sources`` unpacks an npm artwork style (``svg/`` and ``.complete`` inside)."""
    return cache_dir / f"{style.name}-{style.npm_version}"


def find_sources(cache_dir: Path | str | None = None) -> Sources:
    """Look for every source (installs nothing)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    src = Sources(cache_dir=cache_dir)
    src.noto_font = _first(NOTO_FONT_PATHS)
    src.emoji_test = _first(EMOJI_TEST_PATHS)
    src.cldr = [Path(p) for p in CLDR_ANNOTATION_PATHS if Path(p).is_file()]
    if src.noto_font:
        # The file digest, not only the package version, so a changed font rebuilds.
        src.versions["noto"] = f"{_dpkg_version(APT_PACKAGES['noto']) or 'unknown'}+{_file_digest(src.noto_font)}"
    if src.emoji_test:
        head = src.emoji_test.read_text(encoding="utf-8", errors="replace")[:2000]
        ver = next((ln.split(":", 1)[1].strip() for ln in head.splitlines() if ln.startswith("# Version:")), "?")
        src.versions["emoji_test"] = ver
    if src.cldr:
        src.versions["cldr"] = _dpkg_version(APT_PACKAGES["cldr"]) or _file_digest(src.cldr[0])
    for style in STYLES.values():
        if style.kind != "svg":
            continue
        d = artwork_dir(cache_dir, style)
        if (d / ".complete").is_file():
            src.art_dirs[style.name] = d / "svg"
            src.versions[style.name] = (d / ".complete").read_text().strip()
    return src


def missing_packages(src: Sources, styles=("twemoji", "openmoji")) -> list[tuple[str, str]]:
    """(what, Debian package) for each missing system source or shared library."""
    out = []
    # Pillow's wheels bundle raqm but load FriBiDi dynamically; without it ZWJ emoji split.
    if ctypes.util.find_library("fribidi") is None:
        out.append(("FriBiDi library (Pillow raqm)", "libfribidi0"))
    if any(STYLES[s].kind == "svg" for s in styles) and ctypes.util.find_library("cairo") is None:
        out.append(("cairo library (cairosvg)", "libcairo2"))
    if src.noto_font is None:
        out.append(("Noto Color Emoji font", APT_PACKAGES["noto"]))
    if src.emoji_test is None:
        out.append(("emoji-test.txt", APT_PACKAGES["emoji_test"]))
    if not src.cldr:
        out.append(("CLDR annotations", APT_PACKAGES["cldr"]))
    return out


def missing_artwork(src: Sources, styles=("twemoji", "openmoji")) -> list[ArtworkStyle]:
    """The held-out (npm) artwork styles not yet unpacked into the cache."""
    return [STYLES[n] for n in styles if STYLES[n].kind == "svg" and n not in src.art_dirs]


def install_commands(src: Sources, styles=("twemoji", "openmoji")) -> tuple[list[str], list[str]]:
    """(missing names, exact shell commands that would install them)."""
    apt = missing_packages(src, styles)
    missing = [what for what, _ in apt]
    commands = []
    if apt:
        commands.append("apt-get update && apt-get install -y " + " ".join(package for _, package in apt))
    if any(STYLES[s].kind == "svg" for s in styles) and importlib.util.find_spec("cairosvg") is None:
        missing.append("cairosvg (Python package)")
        commands.append(f"{sys.executable} -m pip install 'cairosvg>=2.7'  # or: pip install -e '.[emoji]'")
    for style in missing_artwork(src, styles):
        missing.append(f"{style.name} artwork")
        commands.append(f"npm pack {style.npm}@{style.npm_version} --pack-destination {src.cache_dir}"
                        f"  # then unpack into {artwork_dir(src.cache_dir, style)}/svg")
    return missing, commands


def require_sources(cache_dir: Path | str | None = None, styles=("twemoji", "openmoji")) -> Sources:
    """The installed sources; raises :class:`MissingSourcesError` naming each missing install.

    ``styles`` are the held-out artwork styles needed (Noto, emoji-test and CLDR are
    always needed). Nothing is installed here: ``make emoji-sources`` does that.
    """
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        raise ValueError(f"unknown artwork style(s) {unknown}; known: {sorted(STYLES)}")
    src = find_sources(cache_dir)
    missing, commands = install_commands(src, styles)
    if missing:
        raise MissingSourcesError(missing, commands)
    return src
