r"""FLOPs-matched comparison of sparse variants against a dense baseline, from their run directories.

  python -m experiments.flops_matched runs/mot_untie/dense runs/mot_untie/*  [--smooth 5] [--plot-dir D]

Prints a Markdown table (per variant, split and modality: step-matching ratio, matched steps, η = fraction
of the baseline's training FLOPs needed to reach its final loss, savings = 1/η) and, as the last line, a
JSON object with the same rows. A variant that never reaches the baseline's loss reads "not reached".
Writes loss-vs-FLOPs plots (one PNG per split) to --plot-dir (default: next to the baseline run).
The library behind it is `moma.studies` (importable from notebooks).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

from moma import studies


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("baseline", help="run directory of the dense baseline")
  parser.add_argument("variants", nargs="+", help="run directories of the variants")
  parser.add_argument("--smooth", type=int, default=5,
                      help="centred moving-average window in logged points (odd; 1 = none)")
  parser.add_argument("--plot-dir", help="where the PNGs go (default: BASELINE/../flops_matched)")
  args = parser.parse_args(argv)
  try:
    baseline = studies.load_run(args.baseline)
    base_path = baseline.path.resolve()
    variants = [studies.load_run(v) for v in dict.fromkeys(args.variants)
                if pathlib.Path(v).resolve() != base_path]
    rows = [row for v in variants for row in studies.compare(baseline, v, args.smooth)]
  except ValueError as e:
    parser.error(str(e))

  plot_dir = pathlib.Path(args.plot_dir) if args.plot_dir else baseline.path.parent / "flops_matched"
  plots = studies.plot_loss_vs_flops(baseline, variants, plot_dir, args.smooth)
  print(f"baseline: {baseline.path}\n")
  print(studies.markdown_table(rows))
  print("\nplots: " + " ".join(str(p) for p in plots))
  readable = [{k: studies.NOT_REACHED if v is None else v for k, v in r.items()} for r in rows]
  print(json.dumps({"baseline": str(baseline.path), "smooth": args.smooth, "rows": readable,
                    "plots": [str(p) for p in plots]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
