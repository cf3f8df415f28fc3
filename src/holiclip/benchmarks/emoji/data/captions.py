"""Multi-perspective captions written from a scene's layout, one per text slot.

Mimics the paper's captioning prompts without a VLM: the scene's objects, positions,
sizes, background spec and artwork style are known exactly, so each perspective is
generated from templates with varied wording, synonyms and CLDR keywords:

* ``web``: short alt-text naming only the largest object; sometimes vague (a keyword
  instead of the name) or noisy (file names, download blurbs); about half add one
  distinguishing detail (background, position, colour, count) so web captions are
  mostly distinct.
* ``detail``: every object with size, position and relation to the main object, plus
  the background.
* ``nouns``: comma-separated object names.
* ``background``: the background only.
* ``main``: the largest object only.
* ``style``: artwork style and colour mood, no objects.
"""
from __future__ import annotations

import numpy as np

from .backgrounds import FAMILIES
from .classes import EmojiClass, article, contains_term
from .scenes import SceneObject, position_words, relation, size_word

SLOTS = ("web", "detail", "nouns", "background", "main", "style")

POSITIONS = {
    ("top", "left"): ["in the top left corner", "at the upper left", "in the top-left area"],
    ("top", "center"): ["at the top", "near the top edge", "in the upper middle"],
    ("top", "right"): ["in the top right corner", "at the upper right", "in the top-right area"],
    ("middle", "left"): ["on the left", "at the left side", "along the left edge"],
    ("middle", "center"): ["in the center", "in the middle", "right in the middle"],
    ("middle", "right"): ["on the right", "at the right side", "along the right edge"],
    ("bottom", "left"): ["in the bottom left corner", "at the lower left", "in the bottom-left area"],
    ("bottom", "center"): ["at the bottom", "near the bottom edge", "in the lower middle"],
    ("bottom", "right"): ["in the bottom right corner", "at the lower right", "in the bottom-right area"],
}
SHORT_POS = {k: (f"{k[0]} {k[1]}" if k != ("middle", "center") else "center").replace("middle ", "")
             for k in POSITIONS}
PATTERN_ADJ = {"solid": "plain", "gradient": "gradient", "stripes": "striped", "dots": "dotted",
               "checker": "checkered", "noise": "textured"}
COUNT_WORDS = ["no", "one", "two", "three", "four", "five"]

STYLE_PHRASES = {
    "noto": ["glossy, 3D-looking cartoon icons with soft shading and highlights",
             "shiny emoji artwork with smooth gradients, in a modern phone style",
             "rounded cartoon clip art with gentle shading and a polished digital finish"],
    "twemoji": ["flat vector icons with solid color fills and no outlines",
                "minimalist flat design graphics built from simple geometric shapes",
                "clean, flat cartoon drawings without shading or gradients"],
    "openmoji": ["flat line-art icons with bold dark outlines and pastel fills",
                 "open-source pictograms with thick dark outlines and plain flat colors",
                 "hand-drawn looking flat icons with heavy outlines"],
}
COMPOSITION = {1: ["a minimalist composition with plenty of empty space", "a sparse, simple layout"],
               2: ["a simple, uncluttered composition", "a light, airy arrangement"],
               3: ["a lively composition", "a playful arrangement"],
               4: ["a busy, crowded composition", "a dense, cluttered arrangement"]}

# Reference colours for naming an object's dominant colour (the family base shades).
_FAMILY_RGB = np.array([shades[0][1] for _, shades in FAMILIES], np.float32) / 255.0


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


class Captioner:
    """Writes the six captions of a scene; one instance per build (class table + canvas)."""

    def __init__(self, classes: list[EmojiClass], canvas: int):
        self.classes = classes
        self.canvas = canvas

    # -- small phrase helpers ---------------------------------------------------------
    def name(self, rng, cls: int, p_syn: float = 0.3) -> str:
        c = self.classes[cls]
        if c.synonyms and rng.random() < p_syn:
            return _pick(rng, c.synonyms)
        return c.name

    def a_name(self, rng, cls: int, p_syn: float = 0.3) -> str:
        return article(self.classes[cls], self.name(rng, cls, p_syn))

    def pos(self, rng, obj: SceneObject) -> str:
        return _pick(rng, POSITIONS[position_words(obj.bbox, self.canvas)])

    def size(self, obj: SceneObject) -> str:
        return size_word(obj.size, self.canvas)

    @staticmethod
    def bg_inline(rng, spec: dict) -> str:
        s1, s2 = spec["shades"]
        fam, pat = spec["family_name"], spec["pattern"]
        options = {
            "solid": [f"a plain {s1} background", f"a solid {s1} backdrop", f"a flat {s1} background"],
            "gradient": [f"a gradient from {s1} to {s2}", f"a {s1} to {s2} gradient background"],
            "stripes": [f"{_stripe_dir(spec)} {s1} and {s2} stripes", f"a {fam} striped background"],
            "dots": [f"a {s1} background with {s2} polka dots", f"a dotted {fam} backdrop"],
            "checker": [f"a checkerboard of {s1} and {s2}", f"a checkered {fam} background"],
            "noise": [f"a grainy {fam} texture", f"a speckled {s1} and {s2} backdrop"],
        }[pat]
        return _pick(rng, options)

    def dominant_colour(self, image: np.ndarray, mask: np.ndarray, instance: int) -> str | None:
        """Colour family covering most of an object's pixels (ignoring near-grey pixels)."""
        px = image[mask == instance].astype(np.float32) / 255.0
        if len(px) == 0:
            return None
        sat = px.max(1) - px.min(1)
        px = px[sat > 0.25] if (sat > 0.25).mean() > 0.3 else px
        d = ((px[:, None, :] - _FAMILY_RGB[None]) ** 2).sum(-1)
        counts = np.bincount(d.argmin(1), minlength=len(FAMILIES))
        return FAMILIES[int(counts.argmax())][0]

    # -- the six perspectives ---------------------------------------------------------
    def __call__(self, rng: np.random.Generator, objects: list[SceneObject], bg: dict, style: str,
                 image: np.ndarray, mask: np.ndarray) -> dict[str, str]:
        main = objects[0]
        colour = self.dominant_colour(image, mask, main.instance)
        return {
            "web": self.web(rng, objects, bg, colour),
            "detail": self.detail(rng, objects, bg),
            "nouns": self.nouns(rng, objects, bg),
            "background": self.background(rng, bg),
            "main": self.main(rng, main, colour),
            "style": self.style(rng, style, image, len(objects)),
        }

    def web(self, rng, objects, bg, colour) -> str:
        main = objects[0]
        c = self.classes[main.cls]
        nm = self.name(rng, main.cls, 0.25)
        n = len(objects)
        kind = rng.choice(["plain", "detail", "vague", "noisy"], p=[0.3, 0.45, 0.1, 0.15])
        if kind == "vague" and c.keywords:
            kw = _pick(rng, c.keywords)
            return _pick(rng, [f"{kw} emoji", f"some {kw}", f"{kw} icon on {bg['family_name']}", f"{kw} clipart"])
        if kind == "noisy":
            num = int(rng.integers(10, 9999))
            return _pick(rng, [f"{nm.replace(' ', '_')}_{num}.png", f"IMG_{num:04d} {nm}",
                               f"free {nm} emoji download", f"{nm} vector art stock image",
                               f"{nm} {num % 512 + 16}px png"])
        if kind == "detail":
            opts = [f"{nm} on {bg['shades'][0]}", f"{nm} on a {bg['family_name']} background",
                    f"{nm} {SHORT_POS[position_words(main.bbox, self.canvas)]}",
                    f"{self.size(main)} {nm} icon", f"{nm}, {PATTERN_ADJ[bg['pattern']]} {bg['family_name']} background"]
            if colour:
                opts.append(f"{colour} {nm} emoji")
            if n > 1:
                opts.append(f"{nm} and {COUNT_WORDS[n - 1]} more emoji")
            return _pick(rng, opts)
        return _pick(rng, [nm, f"{nm} emoji", self.a_name(rng, main.cls, 0.25), f"{nm} icon",
                           f"{nm} clipart", f"cute {nm}", f"{nm} sticker", f"{nm} illustration"])

    def detail(self, rng, objects, bg) -> str:
        main = objects[0]
        main_nm = self.name(rng, main.cls)
        intro = _pick(rng, ["The image shows", "This picture contains", "In this illustration there is",
                            "The image depicts", "We see"])
        first = (f"{intro} {article(self.classes[main.cls], self.size(main) + ' ' + main_nm)} "
                 f"{self.pos(rng, main)} on {self.bg_inline(rng, bg)}.")
        parts = [first]
        others = sorted(objects[1:], key=lambda o: -o.area)
        for o in others:
            a = article(self.classes[o.cls], self.size(o) + " " + self.name(rng, o.cls))
            rel = relation(o, main)
            verb = "are" if self.classes[o.cls].plural else "is"
            tmpl = _pick(rng, [
                f"{_cap(a)} {verb} {rel} the {main_nm}, {self.pos(rng, o)}.",
                f"{_cap(self.pos(rng, o))}, {rel} the {main_nm}, there {verb} {a}.",
                f"{_cap(a)} {'sit' if verb == 'are' else 'sits'} {self.pos(rng, o)}, {rel} the {main_nm}.",
            ])
            parts.append(tmpl)
        n = len(objects)
        # No count sentence for four objects: keeps the longest captions near CLIP's 77 tokens.
        if n < 4 and rng.random() < 0.6:
            parts.append("There is only one object in the scene." if n == 1 else
                         _pick(rng, [f"In total there are {COUNT_WORDS[n]} objects.",
                                     f"Altogether {COUNT_WORDS[n]} emoji are visible."]))
        return " ".join(parts)

    def nouns(self, rng, objects, bg) -> str:
        words = [self.name(rng, o.cls) for o in objects]
        order = rng.permutation(len(words))
        words = [words[i] for i in order]
        if rng.random() < 0.4:
            words.append(f"{bg['family_name']} background")
        if rng.random() < 0.2:
            words.append("emoji")
        return ", ".join(words)

    def background(self, rng, bg) -> str:
        s1, s2 = bg["shades"]
        fam, pat = bg["family_name"], bg["pattern"]
        d = _stripe_dir(bg)
        grad = {0.0: "from left to right", 90.0: "from top to bottom"}.get(bg["angle"], "diagonally")
        options = {
            "solid": [f"A plain {s1} background.", f"A flat, uniform {s1} backdrop.",
                      f"The background is a solid {s1} color.", f"An empty {s1} background with no texture.",
                      f"Solid {s1}."],
            "gradient": [f"A smooth gradient from {s1} to {s2}.", f"A {s1} background fading into {s2} {grad}.",
                         f"A soft {fam} gradient, {s1} blending into {s2}.",
                         f"The backdrop is a gradient of {s1} and {s2}, running {grad}."],
            "stripes": [f"{_cap(d)} stripes of {s1} and {s2}.", f"A striped background in {s1} and {s2}.",
                        f"Alternating {s1} and {s2} {d} stripes."],
            "dots": [f"A {s1} background with {s2} polka dots.", f"{_cap(s2)} dots evenly spaced on {s1}.",
                     f"A dotted pattern: {s2} spots on a {s1} backdrop."],
            "checker": [f"A checkerboard of {s1} and {s2} squares.",
                        f"A checkered pattern in two shades, {s1} and {s2}.",
                        f"{_cap(s1)} and {s2} tiles in a checker pattern."],
            "noise": [f"A grainy, speckled texture of {s1} and {s2}.",
                      f"A mottled {fam} background with a noisy texture.",
                      f"A blotchy {fam} texture, mixing {s1} and {s2}."],
        }[pat]
        text = _pick(rng, options)
        if not contains_term(text, fam) or rng.random() < 0.3:
            text += _pick(rng, [f" Overall the backdrop is {fam}.", f" It reads as {fam} overall.",
                                f" The dominant color is {fam}."])
        return text

    def main(self, rng, obj: SceneObject, colour: str | None) -> str:
        c = self.classes[obj.cls]
        a = self.a_name(rng, obj.cls)
        size, pos = self.size(obj), self.pos(rng, obj)
        kw = [k for k in c.keywords]
        rng.shuffle(kw)
        opts = [f"{_cap(article(c, size + ' ' + self.name(rng, obj.cls)))} {pos}.",
                f"The main object is {a}, {size} and placed {pos}.",
                f"{_cap(a)}, shown {size} {pos}."]
        if colour:
            opts.append(f"{_cap(a)}, mostly {colour}, {pos}.")
            opts.append(f"The main object is {a} drawn mostly in {colour}, {size}, {pos}.")
        if kw:
            opts.append(f"{_cap(a)} ({', '.join(kw[:2])}), {size}, {pos}.")
            opts.append(f"The main object is {a}, associated with {' and '.join(kw[:2])}; it sits {pos}.")
        return _pick(rng, opts)

    def style(self, rng, style: str, image: np.ndarray, n_objects: int) -> str:
        px = image.reshape(-1, 3).astype(np.float32) / 255.0
        value = float(px.max(1).mean())
        sat = float((px.max(1) - px.min(1)).mean())
        warmth = float((px[:, 0] - px[:, 2]).mean())
        light = "bright and airy" if value > 0.72 else "dark and moody" if value < 0.35 else "softly lit"
        chroma = "vivid, saturated colors" if sat > 0.45 else "muted, soft colors" if sat < 0.18 \
            else "moderately rich colors"
        temp = "warm" if warmth > 0.12 else "cool" if warmth < -0.12 else "neutral"
        feel = {("warm", True): "cheerful and playful", ("cool", True): "fresh and calm",
                ("neutral", True): "clean and friendly", ("warm", False): "cozy and intimate",
                ("cool", False): "calm and mysterious", ("neutral", False): "quiet and understated"}[
            (temp, value > 0.5)]
        phrase = _pick(rng, STYLE_PHRASES[style])
        comp = _pick(rng, COMPOSITION[min(max(n_objects, 1), 4)])
        return _pick(rng, [
            f"{_cap(phrase)}. The mood is {light}, with {chroma} and a {temp} palette; {comp}.",
            f"Rendered as {phrase}; {comp}, {chroma}, feeling {feel}.",
            f"A digital sticker look: {phrase}. {_cap(temp)} tones, {light}, {feel}.",
            f"{_cap(phrase)}, arranged in {comp}. The colors feel {feel} and {temp}.",
        ])


def _stripe_dir(spec: dict) -> str:
    return {0.0: "vertical", 90.0: "horizontal"}.get(spec["angle"], "diagonal")


def mentioned_classes(text: str, classes: list[EmojiClass]) -> set[int]:
    """Class ids whose name or a synonym occurs in ``text`` as a whole word."""
    return {c.id for c in classes if any(contains_term(text, t) for t in c.terms())}
