"""Training losses of our nets, built from `model.loss` (`_target_`), so unknown keys fail on the signature."""
