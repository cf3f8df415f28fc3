"""Object classes of the emoji benchmark: which emoji, their names, synonyms and keywords.

Candidates come from ``classes.txt`` (hand-picked, visually distinct, in priority order).
Names, groups and subgroups come from Unicode's ``emoji-test.txt``; spoken names and
keywords from the CLDR English annotations. ``choose_classes`` takes the first N
candidates round-robin across Unicode groups, keeping only emoji that every requested
artwork style can draw, and then makes the vocabulary unambiguous: no name or synonym of
one class may occur as a whole word inside a term of another class (so "captions mention
exactly the objects of their scene" is checkable by plain word matching).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .backgrounds import COLOUR_WORDS

CANDIDATES_FILE = Path(__file__).with_name("classes.txt")
# CLDR keywords too generic or too odd for a caption ("print", "button", "comic").
_STOP_KEYWORDS = frozenset({"comic", "print", "button", "entry", "multiplication", "multiply", "cancel",
                            "punctuation", "word", "sign", "symbol", "face", "object"})
FE0F = "\ufe0f"


@dataclass(frozen=True)
class EmojiInfo:
    """One fully-qualified emoji from emoji-test.txt."""

    emoji: str
    name: str
    group: str
    subgroup: str


@dataclass
class EmojiClass:
    id: int
    emoji: str  # fully-qualified sequence (what is rendered)
    codepoints: str  # e.g. "1F43B 200D 2744 FE0F"
    name: str  # short prompt-friendly name
    unicode_name: str  # emoji-test.txt name
    group: str
    subgroup: str
    synonyms: list[str] = field(default_factory=list)  # other names that denote it
    keywords: list[str] = field(default_factory=list)  # CLDR keywords, vague or attribute words
    plural: bool = False

    def terms(self) -> list[str]:
        """All strings that name this class in a caption (name first)."""
        return [self.name, *self.synonyms]

    def to_json(self) -> dict:
        return asdict(self)


def parse_emoji_test(path: Path | str) -> dict[str, EmojiInfo]:
    """Fully-qualified emoji keyed by their sequence without U+FE0F."""
    out: dict[str, EmojiInfo] = {}
    group = subgroup = ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            cps, rest = line.split(";", 1)
            emoji = "".join(chr(int(c, 16)) for c in cps.split())
            # "# 😀 E1.0 grinning face": the name follows the version token.
            name = rest.split("#", 1)[1].strip().split(" ", 2)[2]
            out[emoji.replace(FE0F, "")] = EmojiInfo(emoji, name, group, subgroup)
    return out


def parse_cldr(paths: Iterable[Path | str]) -> dict[str, tuple[str | None, list[str]]]:
    """CLDR annotations: sequence without FE0F -> (spoken name, keywords)."""
    out: dict[str, tuple[str | None, list[str]]] = {}
    for path in paths:
        root = ET.parse(str(path)).getroot()
        for ann in root.iter("annotation"):
            cp = (ann.get("cp") or "").replace(FE0F, "")
            tts, kws = out.get(cp, (None, []))
            text = (ann.text or "").strip()
            if ann.get("type") == "tts":
                tts = tts or text
            else:
                kws = kws or [k.strip() for k in text.split("|") if k.strip()]
            out[cp] = (tts, kws)
    return out


def read_candidates(path: Path | str = CANDIDATES_FILE) -> list[dict]:
    """Rows of classes.txt: {key, name, synonyms, plural}."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(";")] + ["", ""]
        key = "".join(chr(int(c, 16)) for c in parts[0].split() if c.upper() != "FE0F")
        rows.append({
            "key": key,
            "name": parts[1],
            "synonyms": [s.strip() for s in parts[2].split(",") if s.strip()],
            "plural": "plural" in parts[3].split(),
        })
    return rows


def term_pattern(term: str) -> re.Pattern:
    """Whole-word, case-insensitive match; hyphens and apostrophes count as word characters."""
    return re.compile(r"(?<![\w'-])" + re.escape(term.lower()) + r"(?![\w'-])", re.IGNORECASE)


def contains_term(text: str, term: str) -> bool:
    return term_pattern(term).search(text) is not None


def _round_robin(rows: list[dict], info: dict[str, EmojiInfo]) -> list[dict]:
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(info[r["key"]].group, []).append(r)
    queues = list(by_group.values())
    ordered = []
    while any(queues):
        for q in queues:
            if q:
                ordered.append(q.pop(0))
    return ordered


def choose_classes(
    n: int,
    emoji_test: Path | str,
    cldr: Iterable[Path | str],
    available: Callable[[str], bool] = lambda emoji: True,
    candidates: Path | str = CANDIDATES_FILE,
) -> list[EmojiClass]:
    """The first ``n`` usable candidates, round-robin across groups, with clean vocabularies.

    ``available(emoji)`` says whether every artwork style in use can draw the emoji.
    Raises ValueError if fewer than ``n`` are usable or two prompt names clash.
    """
    info = parse_emoji_test(emoji_test)
    cldr_map = parse_cldr(cldr)
    rows = [r for r in read_candidates(candidates) if r["key"] in info]
    chosen = []
    for r in _round_robin(rows, info):
        if len(chosen) == n:
            break
        if available(info[r["key"]].emoji):
            chosen.append(r)
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} usable emoji classes (asked for {n})")
    # Sort the chosen set back into candidate-file order so ids follow Unicode groups.
    order = {r["key"]: i for i, r in enumerate(rows)}
    chosen.sort(key=lambda r: order[r["key"]])

    classes = []
    for i, r in enumerate(chosen):
        e = info[r["key"]]
        tts, kws = cldr_map.get(r["key"], (None, []))
        syn = list(r["synonyms"])
        for extra in (tts, e.name):
            if extra and ":" not in extra and extra.lower() != r["name"].lower() and extra.lower() not in (s.lower() for s in syn):
                syn.append(extra)
        classes.append(EmojiClass(
            id=i, emoji=e.emoji, codepoints=" ".join(f"{ord(c):04X}" for c in e.emoji),
            name=r["name"], unicode_name=e.name, group=e.group, subgroup=e.subgroup,
            synonyms=syn, keywords=list(kws), plural=r["plural"],
        ))
    _clean_vocabulary(classes)
    return classes


def _clean_vocabulary(classes: list[EmojiClass]) -> None:
    """Drop synonyms and keywords that would make a caption name a different class."""
    names = [(c.id, c.name) for c in classes]
    for a, na in names:
        for b, nb in names:
            if a != b and contains_term(nb, na):
                raise ValueError(f"class names clash: {na!r} occurs in {nb!r}; rename one in classes.txt")

    def clashes(term: str, owner: int) -> bool:
        # Another class's term inside this term, or this term inside another class's term.
        for c in classes:
            if c.id == owner:
                continue
            for t in c.terms():
                if contains_term(term, t) or contains_term(t, term):
                    return True
        return False

    # Synonyms: drop those clashing with any *name* first, then with surviving synonyms.
    for c in classes:
        c.synonyms = [s for s in c.synonyms
                      if not any(contains_term(s, o.name) or contains_term(o.name, s)
                                 for o in classes if o.id != c.id)
                      and not any(w in COLOUR_WORDS for w in [s.lower()])]
    for c in classes:
        c.synonyms = [s for s in c.synonyms if not clashes(s, c.id)]
    own = {c.id: {t.lower() for t in c.terms()} for c in classes}
    for c in classes:
        kept = []
        for k in c.keywords:
            low = k.lower()
            if (low in own[c.id] or low in COLOUR_WORDS or low in _STOP_KEYWORDS
                    or not re.fullmatch(r"[a-z][a-z -]{3,}", low) or len(low.split()) > 2):
                continue
            if any(contains_term(k, t) for t in c.terms()) or clashes(k, c.id):
                continue
            kept.append(k)
        c.keywords = kept


def article(cls: EmojiClass, name: str | None = None) -> str:
    """Name with an indefinite article ("an apple", "grapes", "a UFO")."""
    name = name or cls.name
    low = name.lower()
    if low.startswith(("pair of", "bunch of", "loaf of", "cup of", "glass of", "pint of", "sack of")):
        return "a " + name
    if cls.plural:
        return name
    vowel = low[0] in "aeiou" and not low.startswith(("ufo", "uni", "use", "eu", "one"))
    if low.startswith(("hour", "honest")) or vowel:
        return "an " + name
    return "a " + name
