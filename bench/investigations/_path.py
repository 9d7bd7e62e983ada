"""Imported first by the scripts in bench/investigations/: puts bench/ on sys.path, so that `import harness` finds
bench/harness.py (Python puts only a script's own folder there)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
