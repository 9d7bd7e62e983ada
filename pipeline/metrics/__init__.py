"""Thin wrappers over torchmetrics that keep the numbers exact and fast."""
