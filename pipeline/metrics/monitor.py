"""Which way a monitored metric improves: checkpoints, early stopping, sweeps and reports read it from the name."""


def monitor_mode(metric: str) -> str:
    """ "min" for a loss (`val/loss`, `train/loss_box`, …), "max" for every other metric (mIoU, mAP, accuracy)."""
    return "min" if "loss" in metric.rsplit("/", 1)[-1] else "max"
