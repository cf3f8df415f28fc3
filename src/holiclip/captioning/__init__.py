"""Multi-perspective captioning: several prompts x several VLMs -> training JSONL.

Modules, one concern each:
- ``perspectives``: the prompt registry (the paper's prompts + user YAML).
- ``sources``: image sources (folder, list of paths, JSONL, webdataset shards).
- ``backends``: ``openai`` (any chat-completions server), ``hf`` (transformers), and those
  other packages register.
- ``store``: the append-only, crash-safe ``captions.jsonl`` files.
- ``pipeline``: the resumable, concurrent runner.
- ``quality``, ``stats``, ``merge``: flags, statistics, training-JSONL builder.

Nothing heavy is imported here, and nothing here imports torch at module level (only the hf
backend and the stats embedder do, when used); import the submodule you need.
"""
