"""A user's own package: a small Flax linen Transformer classifier (see ``my_module``)."""
