"""Sweep declarations: plain functions returning lists of runs, plus the helpers that build them.

A *run* is a dict: `"config"` (required) is the config file with its optional arg, exactly as
`--config=` takes it (`"configs/mot.py:size=tiny,untie=ffn+qkv"`); `"name"` (optional) names its run
directory; every other key is a dotted config override (`"train.steps": 200`) passed as `--config.KEY=VALUE`.

A sweep is a module `configs/sweeps/NAME.py` with `get_sweep(**kwargs) -> list[run]`, and optionally
`BASELINE = "<run name>"` (the dense reference that `experiments/flops_matched.py` compares against).
`experiments/sweep.py NAME[:k=v,...]` passes `k=v` to `get_sweep` as keyword arguments (strings), except
`seeds=N`, which every sweep takes: it repeats the runs for `train.seed` 0..N-1 (seed outermost, so one seed
of every run comes first and a partial study is comparable), naming them `RUN/seed=K` (one directory per
run holding one per seed: `experiments/flops_matched.py RUN_DIR` reads them as a group).

    product(axis("config", ["configs/dense.py", "configs/mot.py"]), axis("train.seed", [0, 1]))
    # 4 runs: every config with every seed
    zip_(axis("model.d_model", [64, 128]), axis("model.num_heads", [2, 4]))
    # 2 runs: (64, 2), (128, 4)
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import pathlib
import re
from typing import Any, Iterable, Sequence

Run = dict[str, Any]


def axis(key: str, values: Iterable[Any]) -> list[Run]:
  """One run per value: `[{key: v} for v in values]`."""
  return [{key: v} for v in values]


def _merge(runs: Sequence[Run]) -> Run:
  merged: Run = {}
  for run in runs:
    for key, value in run.items():
      if key in merged and merged[key] != value:
        raise ValueError(f"sweep: key {key!r} set twice ({merged[key]!r} and {value!r}); "
                         "give each key in one axis only")
      merged[key] = value
  return merged


def product(*axes: Sequence[Run]) -> list[Run]:
  """Cartesian product of lists of runs, each combination merged into one run (first axis outermost)."""
  return [_merge(combo) for combo in itertools.product(*axes)]


def zip_(*axes: Sequence[Run]) -> list[Run]:
  """Element-wise merge of equally long lists of runs."""
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise ValueError(f"zip_: axes have different lengths {[len(a) for a in axes]}; zip needs equal lengths")
  return [_merge(combo) for combo in zip(*axes)]


def run_name(run: Run) -> str:
  """The run's directory name: its `name`, else derived from the config file, arg and overrides."""
  if "config" not in run:
    raise ValueError(f"sweep run {run!r} has no 'config' key; set it to e.g. 'configs/mot.py:size=tiny'")
  if "name" in run:
    components = str(run["name"]).split("/")  # an explicit name may nest: `mot/seed=1`
  else:
    path, _, arg = str(run["config"]).partition(":")
    parts = [pathlib.Path(path).stem] + ([arg] if arg else [])
    parts += [f"{k}={'+'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
              for k, v in run.items() if k != "config"]
    components = [",".join(parts)]
  # Keep names shell- and filesystem-friendly; `=`, `,`, `+`, `.` and `-` read well in a directory name
  # (no empty, `.` or `..` components).
  components = [re.sub(r"[^A-Za-z0-9._+=,-]", "_", c) for c in components]
  return "/".join(c if c.strip(".") else c.replace(".", "_") or "_" for c in components)


def group_name(name: str) -> str:
  """The run a seeded run repeats: `"mot/seed=1"` → `"mot"` (other names are their own group)."""
  return name.split("/", 1)[0]


def seeded(runs: Sequence[Run], seeds: int) -> list[Run]:
  """`runs` for `train.seed` 0..seeds-1, seed outermost, each named `RUN/seed=K`."""
  if seeds < 1:
    raise ValueError(f"sweep arg seeds={seeds}: expected a positive number of seeds, e.g. seeds=3")
  clashing = [run_name(r) for r in runs if "train.seed" in r]
  if clashing:
    raise ValueError(f"sweep arg seeds= repeats runs over train.seed, but runs {clashing} set it already")
  return [{**r, "name": f"{run_name(r)}/seed={seed}", "train.seed": seed}
          for seed in range(seeds) for r in runs]


def overrides(run: Run) -> dict[str, Any]:
  """The dotted config overrides of a run (everything but `config` and `name`)."""
  return {k: v for k, v in run.items() if k not in ("config", "name")}


def known() -> list[str]:
  """Names of the sweeps declared in this folder."""
  here = pathlib.Path(__file__).parent
  return sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))


def load(spec: str) -> tuple[str, list[Run], str | None]:
  """`"NAME[:k=v,...]"` → (name, runs, baseline run name or None); unknown names raise one ValueError."""
  name, _, arg = spec.partition(":")
  if name not in known():
    raise ValueError(f"unknown sweep {name!r}; known sweeps: {', '.join(known())} "
                     "(declared as configs/sweeps/NAME.py)")
  module = importlib.import_module(f"{__name__}.{name}")
  pairs = [kv.split("=", 1) for kv in arg.split(",")] if arg else []
  if any(len(p) != 2 for p in pairs):
    raise ValueError(f"sweep arg {arg!r} must be k=v pairs separated by commas, e.g. {name}:size=tiny")
  kwargs = dict(pairs)
  seeds = kwargs.pop("seeds", None)
  params = inspect.signature(module.get_sweep).parameters
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    raise ValueError(f"sweep {name!r} takes arguments {[*params, 'seeds']}, not {unknown}")
  runs = module.get_sweep(**kwargs)
  if seeds is not None:
    if not seeds.isdigit():
      raise ValueError(f"sweep arg seeds={seeds!r}: expected a positive number of seeds, e.g. seeds=3")
    runs = seeded(runs, int(seeds))
  names = [run_name(r) for r in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"sweep {name!r}: run names {duplicates} repeat; give the runs distinct 'name' keys")
  baseline = getattr(module, "BASELINE", None)
  if baseline is not None and baseline not in {group_name(n) for n in names}:
    raise ValueError(f"sweep {name!r}: BASELINE {baseline!r} is not one of its runs {names}")
  return name, runs, baseline
