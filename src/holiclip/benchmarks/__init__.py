"""Built-in benchmarks: each one a product of its own (data, captions, evaluation, demo) built on
the library. Nothing outside this package imports it; the CLI and entry points reach it by name."""
