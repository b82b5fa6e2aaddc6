"""Torch transformer models and the checkpoint loaders that fill them."""
