"""Hydra sweeper `hydra/sweeper=pipeline_optuna`: Optuna ask-and-tell over the override grammar, resumable."""
