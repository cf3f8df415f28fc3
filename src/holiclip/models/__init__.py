"""Architectures; knows nothing about data, losses or training."""
