r"""Scaling laws per architecture and modality from run directories: L(C) = E + A·C^(−α), η(C) vs a baseline.

  python -m experiments.scaling experiments/out/scaling/* [--json OUT] [--figures DIR] [--baseline dense]

Each argument is a run directory or a seeded run's directory (`seed=K/` run directories); files (a sweep's
results.csv) are skipped. Runs are grouped
by the architecture their config.json describes (dense, mot, moma_4t4i, moe_8shared, mamba, mom, …; see
`moma.scaling.architecture`); every architecture needs runs at 3 or more training budgets. Per
architecture and modality it fits validation loss vs training FLOPs on each run's final loss and on every
validation row (Chinchilla approach 3), with 95% bootstrap intervals over runs and seeds; η(C), the fraction
of the baseline's compute at which a variant reaches the baseline's loss (Mixture-of-Mamba variants against
mamba when present); and each law extrapolated to the papers' budgets (`moma.scaling.BUDGETS`). Prints
Markdown tables; --json writes everything, --figures one PNG per modality.
The library behind it is `moma.scaling` (importable from notebooks).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Sequence

from moma import cli
from moma import scaling
from moma import studies


def _cell(value: float | None, ci: list[float] | None) -> str:
  text = studies.NOT_REACHED if value is None else f"{value:.3g}"
  return text + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


def _with_intervals(rows: Sequence[dict], fields: Sequence[str]) -> list[dict]:
  """Rows for printing: each of `fields` and its `_ci95` in one cell."""
  return [{k: _cell(r[k], r.get(f"{k}_ci95")) if k in fields else v for k, v in r.items()
           if not (k.endswith("_ci95") and k[:-5] in fields)} for r in rows]


def _eta_pivot(rows: Sequence[dict], flops: Sequence[float]) -> list[dict]:
  """One row per (kind, variant, modality), a column per budget of `flops`."""
  table: dict[tuple, dict] = {}
  for r in rows:
    if r["flops"] in flops:
      row = table.setdefault((r["kind"], r["variant"], r["modality"]), {
          "kind": r["kind"], "variant": r["variant"], "baseline": r["baseline"], "modality": r["modality"]})
      row[f"η at C={r['flops']:.2g}"] = _cell(r["eta"], r["eta_ci95"])
  return list(table.values())


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dirs", nargs="+", help="run directories or seeded runs' directories")
  parser.add_argument("--json", help="write every fit, interval, η and extrapolation here")
  parser.add_argument("--figures", help="directory for one loss-vs-FLOPs PNG per modality")
  parser.add_argument("--baseline", default="dense", help="architecture η is measured against (default dense)")
  parser.add_argument("--replicates", type=int, default=200, help="bootstrap replicates (default 200)")
  parser.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
  parser.add_argument("--budgets", type=int, default=5, help="η at this many budgets spanning the runs")
  args = parser.parse_args(argv)
  files = [p for p in args.run_dirs if pathlib.Path(p).is_file()]  # a glob also matches a study's tables
  try:
    runs = [run for path in dict.fromkeys(args.run_dirs) if path not in files for run in studies.load_group(path)]
    study = scaling.fit_study(runs, args.baseline, args.replicates, args.seed)
  except ValueError as e:
    parser.error(str(e))

  grid = study.flops_grid(args.budgets)
  laws, etas, extrapolated = scaling.law_rows(study), scaling.eta_rows(study, grid), scaling.extrapolation_rows(study)
  unfinished = [str(r.run.path) for r in study.runs if not r.run.finished]
  print(f"{len(runs)} runs; {args.replicates} bootstrap replicates; intervals are 95% percentile intervals\n")
  if files:
    print(f"note: skipped files (not run directories): {', '.join(files)}\n")
  if unfinished:
    print(f"note: unfinished runs (their last validation loss counts as final): {', '.join(unfinished)}\n")
  print("## Fitted laws L(C) = E + A·C^(−α), C in training FLOPs\n")
  print(studies.markdown_table(_with_intervals(laws, ("E", "A", "alpha"))))
  print("\n## η(C): fraction of the baseline's compute at which the variant reaches its loss\n")
  print(studies.markdown_table(_eta_pivot(etas, list(grid[::2]))))
  print("\n## Extrapolation to the papers' budgets (far outside the data: read the intervals)\n")
  print(studies.markdown_table(_with_intervals(extrapolated, ("loss", "eta"))))
  figures = scaling.plot(study, args.figures) if args.figures else []
  if figures:
    print("\nfigures: " + " ".join(map(str, figures)))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({
        "runs": [{"path": str(r.run.path), "architecture": r.arch, "size": scaling.size_label(r.run.config),
                  "seed": r.run.seed, "finished": r.run.finished} for r in study.runs],
        "baseline": args.baseline, "replicates": args.replicates, "seed": args.seed,
        "huber_delta": scaling.HUBER_DELTA, "laws": laws, "eta": etas, "extrapolation": extrapolated,
        "budgets": scaling.BUDGETS, "figures": [str(p) for p in figures]}, indent=1))
  return 0


if __name__ == "__main__":
  cli.run_argparse(main)
