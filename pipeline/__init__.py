"""Experiment-tracked training pipeline for segmentation, detection and instance segmentation."""
