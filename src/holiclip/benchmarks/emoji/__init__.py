"""The built-in emoji benchmark (see docs/emoji.md): scenes of emoji with captions from six
perspectives, and CLIP vs O2M vs Holistic CLIP trained and compared on them.

Modules, in data-flow order:
- ``data``: sources, classes, sprites, scenes and their captions -> the cached dataset and loaders;
- ``caption_backend``: the ``scene`` captioning backend (a scene's captions, looked up), found by
  ``holiclip caption`` through the ``holiclip.captioning.backends`` entry point;
- ``evaluate``: every headline task on one model (fused, per branch, routed);
- ``demo``: the side-by-side run behind ``make demo``; ``report``: its report and plots.

Nothing heavy is imported here; import the submodule you need.
"""
