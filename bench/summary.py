"""The one-line results every bench script writes with `--summary PATH`, for `bench/run_all.py`'s table."""

from __future__ import annotations

import json
from pathlib import Path


def row(bench: str, what: str, value: float, unit: str, reference: str | None = None, target: str | None = None,
        met: bool | None = None) -> dict:  # fmt: skip
    """One result: `value` in `unit` ("x" for a ratio to `reference`), the issue's `target` and whether it is met."""
    return {"bench": bench, "what": what, "value": float(value), "unit": unit, "reference": reference,
            "target": target, "met": met}  # fmt: skip


def write(path: str | Path | None, rows: list[dict]) -> None:
    """Write the rows as JSON to `path` (nothing when no path was asked for)."""
    if path:
        Path(path).write_text(json.dumps(rows, indent=1))
