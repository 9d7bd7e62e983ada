"""Training machinery: callbacks, checkpoint IO and resume resolution, the launcher/rank environment, config
validation, loading a trained task for eval/predict/export."""
