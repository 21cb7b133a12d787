r"""Seeds' `moma.evaluate` scores side by side: the mean and 95% interval of every metric, per run.

  python -m experiments.evaluations RUN [RUN ...]      # each RUN holds seed=K/evaluation.json

Each argument is a seeded run's directory (`seed=K/` run directories holding `evaluation.json`, written by
`python -m moma.evaluate --workdir=RUN/seed=K`). Prints one Markdown table: a row per metric, a column per
run with `mean (low–high; seed values)`, the interval being the 95% Student-t one across seeds
(`moma.studies.interval95`). Runs evaluated with different settings (guidance, steps, images) are refused.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Sequence

import numpy as np

from moma import cli
from moma import studies

SETTINGS = ("cfg_scale", "num_steps", "per_digit", "num_captions")


def load(run: str) -> list[dict]:
  """The evaluation.json of each seed=K/ directory of `run`, in seed order."""
  paths = sorted(pathlib.Path(run).glob("seed=*/evaluation.json"), key=lambda p: int(p.parent.name[5:]))
  if not paths:
    raise ValueError(f"{run}: no seed=K/evaluation.json; run python -m moma.evaluate --workdir={run}/seed=K")
  return [json.loads(p.read_text()) for p in paths]


def cell(values: Sequence[float]) -> str:
  ci = studies.interval95(values)
  seeds = ", ".join(f"{v:.3g}" for v in values)
  return f"{np.mean(values):.3g} ({ci[0]:.3g}–{ci[1]:.3g}; {seeds})" if ci else f"{values[0]:.3g}"


def table(runs: dict[str, list[dict]]) -> str:
  first_name, first = next(iter(runs.items()))
  for name, evals in runs.items():
    for key in SETTINGS:
      if {e.get(key) for e in evals} != {first[0].get(key)}:
        raise ValueError(f"{name}: evaluated with {key}={sorted({str(e.get(key)) for e in evals})}, "
                         f"{first_name} with {first[0].get(key)}; evaluate every seed with the same settings")
  metrics = [k for k, v in first[0].items() if isinstance(v, float) and k not in SETTINGS]
  rows = [{"metric": m, **{name: cell([e[m] for e in evals]) for name, evals in runs.items()}} for m in metrics]
  return studies.markdown_table(rows)


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", help="seeded run directories (RUN/seed=K/evaluation.json)")
  args = parser.parse_args(argv)
  try:
    print(table({pathlib.Path(run).name: load(run) for run in args.runs}))
  except ValueError as e:
    parser.error(str(e))
  return 0


if __name__ == "__main__":
  cli.run_argparse(main)
