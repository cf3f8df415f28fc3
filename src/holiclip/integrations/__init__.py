"""Integrations with the tools researchers use CLIP models in."""
