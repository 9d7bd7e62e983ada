"""Entry points, one module per command: each a plain function (`train(cfg)`, `evaluate(cfg)`, …) and a thin
`main`. They import library code, never each other; what they share is in `common.py`."""

from importlib.resources import files

import pipeline.training.resolvers  # noqa: F401  (registers the ${pipeline.*} resolvers the configs use)

# The configs ship inside the package (`pipeline.conf`, mapped from the repository's conf/ by pyproject.toml), so
# an editable install, a wheel and `python -m` find the same files.
CONF_DIR = str(files("pipeline.conf"))
