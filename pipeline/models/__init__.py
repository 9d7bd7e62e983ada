"""Nets only: tensors in, tensors out (backbones, FCN, dense-to-conv surgery)."""
