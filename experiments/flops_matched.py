r"""FLOPs-matched comparison of sparse variants against a dense baseline, from their run directories.

  python -m experiments.flops_matched runs/mot_untie/dense runs/mot_untie/*  [--smooth 5] [--plot-dir D]
  python -m experiments.flops_matched ROOT/architectures,size=small,seeds=3/{dense,mot,mom}  # seeded runs

Each argument is a run directory or a seeded run's directory (`seed=K/` run directories, from
`experiments/sweep.py NAME:seeds=N`); each variant seed is compared with the baseline run of the same seed.
Prints a Markdown table (per variant, split and modality, across seeds: step-matching ratio, η = fraction
of the baseline's training FLOPs needed to reach its final loss, savings = 1/η, each mean with its 95%
Student-t interval across seeds, `reached` = seeds that reach the baseline's loss, `final_loss_delta` =
the variant's final loss minus the baseline's (paired by seed, with its interval), and `unfinished_seeds`:
seeds left out because the variant or the baseline is still training) and, as the last
line, a JSON object with those rows and the per-seed ones. A variant that never reaches the baseline's loss
reads "not reached"; an interval needs two seeds ("—" below). Writes loss-vs-FLOPs plots (one PNG per
split, first seed of each run) to --plot-dir (default: next to the baseline run).
The library behind it is `moma.studies` (importable from notebooks).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Sequence

from moma import cli
from moma import studies


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("baseline", help="run directory of the dense baseline")
  parser.add_argument("variants", nargs="+", help="run directories of the variants")
  parser.add_argument("--smooth", type=int, default=5,
                      help="centred moving-average window in logged points (odd; 1 = none)")
  parser.add_argument("--plot-dir", help="where the PNGs go (default: BASELINE/../flops_matched)")
  args = parser.parse_args(argv)
  base_path = pathlib.Path(args.baseline).resolve()
  try:
    baselines = studies.load_group(args.baseline)
    groups = [(pathlib.Path(v).name, studies.load_group(v)) for v in dict.fromkeys(args.variants)
              if pathlib.Path(v).resolve() != base_path]
    rows, per_seed = [], []
    for name, variants in groups:
      across, each = studies.compare_seeds(baselines, variants, args.smooth, name)
      rows += across
      per_seed += each
  except ValueError as e:
    parser.error(str(e))

  plot_dir = pathlib.Path(args.plot_dir) if args.plot_dir else base_path.parent / "flops_matched"
  plots = studies.plot_loss_vs_flops(baselines[0], [g[0] for _, g in groups], plot_dir, args.smooth)
  print(f"baseline: {args.baseline} (seeds {[run.seed for run in baselines]})\n")
  print(studies.markdown_table(rows))
  print("\nplots: " + " ".join(str(p) for p in plots))
  readable = lambda rs: [{k: studies.NOT_REACHED if v is None and not k.endswith("_ci95") else v  # pylint: disable=unnecessary-lambda-assignment
                          for k, v in r.items()} for r in rs]
  print(json.dumps({"baseline": args.baseline, "smooth": args.smooth, "rows": readable(rows),
                    "per_seed": readable(per_seed), "plots": [str(p) for p in plots]}))
  return 0


if __name__ == "__main__":
  cli.run_argparse(main)
