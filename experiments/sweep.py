r"""Run a declared sweep locally in sequence, or print one command per run for a cluster scheduler.

  python -m experiments.sweep mot_untie --root runs                    # run, skip finished, gather
  python -m experiments.sweep mot_untie:size=S --root runs --print-commands | sbatch-array ...
  python -m experiments.sweep architectures --root runs --set train.steps=300 --only 'mo*'
  python -m experiments.sweep architectures --root runs --gather-only  # table of what exists
  python -m experiments.sweep architectures:size=small,seeds=3 --root /work/studies  # CPU study, 3 seeds

Runs live in ROOT/SWEEP/RUN_NAME, where SWEEP is the sweep spec plus any --set overrides (so different
sizes or step counts never share a directory). A run is finished when its metrics.jsonl logs train.steps
(`moma.studies.is_finished`); finished runs are skipped, unfinished ones resume from their checkpoint.
The results table goes to ROOT/SWEEP/results.{csv,md}. Run from the repository root (config paths are
relative to it). Declarations: configs/sweeps/NAME.py (see configs/sweeps/__init__.py).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Any, Sequence

from configs import sweeps
from moma import cli
from moma import studies


def format_value(value: Any) -> str:
  """A Python value as `--config.KEY=` takes it (ml_collections parses tuples and bools from literals)."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def command(run: sweeps.Run, run_dir: pathlib.Path, sets: dict[str, str], python: str = "python"):
  """argv that trains `run` into `run_dir`; `sets` (from --set) override every run's own overrides."""
  overrides = {**sweeps.overrides(run), **sets}
  return [python, "-m", "moma.main", f"--config={run['config']}", f"--workdir={run_dir}",
          *[f"--config.{k}={format_value(v)}" for k, v in overrides.items()]]


def sweep_dir(root: str | pathlib.Path, spec: str, sets: dict[str, str]) -> pathlib.Path:
  name = ",".join([spec.replace(":", ","), *[f"{k}={v}" for k, v in sets.items()]])
  return pathlib.Path(root) / re.sub(r"[^A-Za-z0-9._+=,-]", "_", name)


def select(runs: Sequence[sweeps.Run], only: str | None) -> list[sweeps.Run]:
  """Runs whose names match one of the comma-separated names or glob patterns in `only`."""
  if not only:
    return list(runs)
  patterns = only.split(",")
  chosen = [r for r in runs if any(fnmatch.fnmatchcase(sweeps.run_name(r), p) for p in patterns)]
  if not chosen:
    raise ValueError(f"--only {only!r} matches no run; runs: {', '.join(sweeps.run_name(r) for r in runs)}")
  return chosen


def expected_steps(run: sweeps.Run, sets: dict[str, str]) -> int | None:
  """train.steps as overridden by --set or the run; None: whatever config.json says."""
  steps = sets.get("train.steps", run.get("train.steps"))
  return None if steps is None else int(steps)


def gather(runs: Sequence[sweeps.Run], directory: pathlib.Path, sets: dict[str, str],
           failed: Sequence[str] = ()) -> list[dict[str, Any]]:
  """One row per run: name, config, overrides, status, then `moma.studies.summarize` of its directory."""
  rows = []
  for run in runs:
    name = sweeps.run_name(run)
    run_dir = directory / name
    row: dict[str, Any] = {"run": name, "config": run["config"],
                           "overrides": " ".join(f"{k}={v}" for k, v in
                                                 {**sweeps.overrides(run), **sets}.items())}
    if not (run_dir / "config.json").exists():
      row["status"] = "failed" if name in failed else "missing"
    else:
      finished = studies.is_finished(run_dir, expected_steps(run, sets))
      row["status"] = "finished" if finished else ("failed" if name in failed else "partial")
      row.update(studies.summarize(studies.load_run(run_dir)))
    rows.append(row)
  return rows


def write_results(directory: pathlib.Path, rows: Sequence[dict[str, Any]]) -> list[pathlib.Path]:
  directory.mkdir(parents=True, exist_ok=True)
  columns = list(dict.fromkeys(k for r in rows for k in r))
  csv_path, md_path = directory / "results.csv", directory / "results.md"
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  md_path.write_text(studies.markdown_table(rows) + "\n")
  return [csv_path, md_path]


def parse_sets(pairs: Sequence[str]) -> dict[str, str]:
  bad = [p for p in pairs if "=" not in p]
  if bad:
    raise ValueError(f"--set takes KEY=VALUE (e.g. --set train.steps=300), got {bad}")
  return dict(p.split("=", 1) for p in pairs)


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweep", help=f"NAME[:k=v,...], NAME one of {', '.join(sweeps.known())}")
  parser.add_argument("--root", required=True, help="folder that holds the sweep's run directories")
  parser.add_argument("--print-commands", action="store_true", help="print one command per run, run none")
  parser.add_argument("--gather-only", action="store_true", help="run nothing; write the results table")
  parser.add_argument("--only", help="comma-separated run names or glob patterns")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override applied to every run (repeatable)")
  args = parser.parse_args(argv)
  try:
    name, runs, baseline = sweeps.load(args.sweep)
    sets = parse_sets(args.set)
    chosen = select(runs, args.only)
  except ValueError as e:
    parser.error(str(e))
  directory = sweep_dir(args.root, args.sweep, sets)

  if args.print_commands:
    for run in chosen:
      print(shlex.join(command(run, directory / sweeps.run_name(run), sets)))
    return 0

  failed = []
  for run in [] if args.gather_only else chosen:
    run_name = sweeps.run_name(run)
    run_dir = directory / run_name
    if studies.is_finished(run_dir, expected_steps(run, sets)):
      print(f"[sweep {name}] {run_name}: finished, skipped", flush=True)
      continue
    argv_run = command(run, run_dir, sets, python=sys.executable)
    print(f"[sweep {name}] {run_name}: {shlex.join(argv_run)}", flush=True)
    if subprocess.run(argv_run, check=False).returncode != 0:
      failed.append(run_name)

  rows = gather(runs, directory, sets, failed)
  for path in write_results(directory, rows):
    print(f"[sweep {name}] wrote {path}")
  print(studies.markdown_table(rows))
  if baseline is not None:
    groups = dict.fromkeys(sweeps.group_name(sweeps.run_name(r)) for r in runs)
    variants = " ".join(str(directory / g) for g in groups if g != baseline)
    print(f"\nFLOPs-matched: python -m experiments.flops_matched {directory / baseline} {variants}")
  if failed:
    print(f"[sweep {name}] failed runs: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  cli.run_argparse(main)
