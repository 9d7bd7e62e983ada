"""Run the side-by-side benches with budgets that fit 15 minutes on 2 CPU cores; print one table of their headlines.

Each bench runs in its own process, one after another (nothing else should run on the machine meanwhile), with
the reduced arguments below, and writes its headline rows with `--summary` (`harness.row`): a value, its unit
("x" is a ratio to the reference named beside it, measured in the same run), the target and whether it is met.
The full-size runs and their readings are in BENCHMARKS.md; this table is the quick check that a change did not
move them. A bench that fails is reported as failed and the others still run.

Not run here: the trainings to a quality target (fcn_shapes, yolo_shapes, instance_shapes, real_data: minutes
to an hour each), peers (the trainings beside Ultralytics and smp: hours; needs the peers extra), gpu (needs a
CUDA device), and the one-off investigations in bench/investigations/.

    python bench/run_all.py                          # all, ~15 min on 2 idle cores
    python bench/run_all.py --only startup,postprocess
    python bench/run_all.py --markdown table.md      # also write the table as Markdown
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# name -> arguments of its script (bench/<name>.py) for the quick run; budgets in seconds on 2 idle cores.
BENCHES: dict[str, list[str]] = {
    "startup": ["--repeats", "3"],
    "eval_speed": ["--images", "150", "--repeats", "3"],
    "overhead": ["--repeats", "3", "--measured", "2", "--num-train", "64", "--num-val", "16", "--extra-repeats", "0"],
    "throughput": [],
    "postprocess": [],
    "step_share": ["--repeats", "9"],
    "input_scaling": [],
    "tracking": [],
}


def run_bench(name: str, arguments: list[str], folder: Path) -> tuple[list[dict], float, str | None]:
    """Run bench/<name>.py with `arguments`; its summary rows, wall seconds and an error text where it failed."""
    out = folder / f"{name}.json"
    command = [sys.executable, str(BENCH / f"{name}.py"), *arguments, "--summary", str(out)]
    print(f"$ {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (folder / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode or not out.exists():
        return [], seconds, f"exit {done.returncode}: {(done.stderr or done.stdout)[-600:]}"
    return json.loads(out.read_text()), seconds, None


def table(rows: list[dict]) -> str:
    """The rows as one Markdown table."""
    lines = ["| bench | what | value | relative to | target | met |", "|---|---|---:|---|---|---|"]
    for r in rows:
        value = f"{r['value']:.3f}{'x' if r['unit'] == 'x' else ' ' + r['unit']}"
        met = {True: "yes", False: "**no**", None: "–"}[r["met"]]
        reference, target = r["reference"] or "–", r["target"] or "–"
        lines.append(f"| {r['bench']} | {r['what']} | {value} | {reference} | {target} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(BENCHES))
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--logs", help="keep each bench's output in this folder (default: a temporary one)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        sys.exit(f"unknown bench(es) {unknown}; choose from {list(BENCHES)}")
    begun = time.perf_counter()
    rows: list[dict] = []
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.logs or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            found, seconds, error = run_bench(name, BENCHES[name], folder)
            print(f"  {name}: {seconds:.0f} s" + (f", FAILED ({error.splitlines()[0]})" if error else ""), flush=True)
            rows += found
            if error:
                failures[name] = error
    text = table(rows)
    total = time.perf_counter() - begun
    print(f"\n{text}\n\ntotal {total:.0f} s ({total / 60:.1f} min)")
    for name, error in failures.items():
        print(f"\n{name} failed:\n{error}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
