r"""Which runs of the CPU studies are finished, running or still to come, and how long the rest takes.

  python -m experiments.studies_status --root /work/studies          # the issue-16 studies (STUDIES)
  python -m experiments.studies_status --root runs mot_untie:size=tiny,seeds=2   # any declared sweep

Per run: status (finished; running = its trainer holds the workdir lock; partial = stopped part-way;
missing), last logged step of train.steps, median tokens/s of its last 10 logs, and minutes left at that
pace. A run not started yet is projected at the pace of the same run at another seed, else left out of the
total (counted as "not paced yet": architectures differ several-fold in pace on a CPU).
Reads run directories only (the runner writes them as `experiments/sweep.py SPEC --root ROOT` does);
starts nothing. Last line: JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
from typing import Sequence

import numpy as np

from configs import sweeps
from experiments import sweep
from moma import cli
from moma import studies

# The issue-16 studies at the CPU preset (RESULTS.md).
STUDIES = ("architectures:size=small,seeds=3", "mot_untie:size=small,seeds=1", "mom_untie:size=small,seeds=1")


def holder_alive(run_dir: pathlib.Path) -> bool:
  """Whether the run's workdir lock names a live process on this host (the trainer is running)."""
  try:
    holder = json.loads((run_dir / "lock").read_text())
    os.kill(int(holder["pid"]), 0)
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return holder.get("host") == os.uname().nodename


def planned(run: sweeps.Run) -> tuple[int, int]:
  """(train.steps, tokens per step) the run's config declares (for runs not started yet)."""
  path, _, arg = run["config"].partition(":")
  module = importlib.import_module(".".join(pathlib.Path(path).with_suffix("").parts))
  config = module.get_config(arg or None)
  for key, value in sweeps.overrides(run).items():
    section, _, field = key.partition(".")
    if section == "train" and field in ("steps", "batch_size", "seq_len"):
      config.train[field] = int(value)
  return config.train.steps, config.train.batch_size * config.train.seq_len


def run_status(run: sweeps.Run, run_dir: pathlib.Path) -> dict:
  steps, tokens_per_step = planned(run)
  row = {"run": sweeps.run_name(run), "status": "missing", "step": 0, "steps": steps,
         "tokens_per_step": tokens_per_step, "tokens_per_s": None}
  if not (run_dir / "config.json").exists():
    return row
  loaded = studies.load_run(run_dir)
  row.update(steps=int(studies.config_value(loaded.config, "train.steps")), step=studies.last_step(run_dir) or 0,
             tokens_per_step=loaded.tokens_per_step())
  _, pace = loaded.series("tokens_per_s")
  if len(pace):
    # The first log pays for compilation; the last 10 follow a change of pace (a resume on other code, or
    # other load on the machine) sooner than the median of the whole run.
    row["tokens_per_s"] = float(np.median((pace[1:] if len(pace) > 1 else pace)[-10:]))
  if studies.is_finished(run_dir, row["steps"]):
    row["status"] = "finished"
  else:
    row["status"] = "running" if holder_alive(run_dir) else "partial"
  return row


def status(root: str | pathlib.Path, spec: str) -> dict:
  """{"sweep", "directory", "runs": [row per run], "finished", "total", "minutes_left", "unpaced"} of one
  study; minutes_left sums the runs whose pace is known (their own, or the same run's at another seed)."""
  _, runs, _ = sweeps.load(spec)
  directory = sweep.sweep_dir(root, spec, {})
  rows = [run_status(run, directory / sweeps.run_name(run)) for run in runs]
  paces = {sweeps.group_name(r["run"]): r["tokens_per_s"] for r in rows if r["tokens_per_s"]}
  for row in rows:
    pace = row["tokens_per_s"] or paces.get(sweeps.group_name(row["run"]))
    row["minutes_left"] = (0.0 if row["status"] == "finished" else None if pace is None else
                           (row["steps"] - row["step"]) * row["tokens_per_step"] / pace / 60)
  known = [r["minutes_left"] for r in rows if r["minutes_left"] is not None]
  return {"sweep": spec, "directory": str(directory), "runs": rows,
          "finished": sum(r["status"] == "finished" for r in rows), "total": len(rows),
          "minutes_left": sum(known), "unpaced": len(rows) - len(known)}


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("specs", nargs="*", default=list(STUDIES), help="sweeps as experiments/sweep.py takes them")
  parser.add_argument("--root", required=True, help="the --root the studies run under")
  args = parser.parse_args(argv)
  try:
    reports = [status(args.root, spec) for spec in args.specs]
  except ValueError as e:
    parser.error(str(e))
  for report in reports:
    unpaced = f" + {report['unpaced']} runs not paced yet" if report["unpaced"] else ""
    print(f"{report['sweep']}: {report['finished']}/{report['total']} finished, "
          f"~{report['minutes_left'] / 60:.1f} h left at the measured pace{unpaced} ({report['directory']})")
    for r in report["runs"]:
      pace = f"{r['tokens_per_s'] / 1e3:.1f}k tok/s" if r["tokens_per_s"] else "-"
      eta = "" if r["minutes_left"] in (None, 0.0) else f", ~{r['minutes_left']:.0f} min left"
      print(f"  {r['run']:28s} {r['status']:9s} step {r['step']}/{r['steps'] or '?'}  {pace}{eta}")
  print(json.dumps({"studies": reports}))
  return 0


if __name__ == "__main__":
  cli.run_argparse(main)
