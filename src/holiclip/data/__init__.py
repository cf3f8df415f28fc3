"""Samples = one image + named captions: schema, readers, datasets."""
