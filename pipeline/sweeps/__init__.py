"""Hyper-parameter sweeps over Hydra's launchers: parent/child MLflow runs, job names, Optuna pruning."""
