"""Hooks: module-level functions bound with functools.partial to tensors and ints."""
