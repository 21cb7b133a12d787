"""Run directories → results tables and the papers' FLOPs-matched metrics.

A run directory (docs/design.md) holds `config.json` and `metrics.jsonl`. From them:

- `summarize(run)`: one results-table row (last logged losses, throughput, FLOPs);
- `step_matching(...)`: for each baseline step, the step at which the variant first reaches the baseline's
  (smoothed) loss, and the slope of a line through the origin fitted to those pairs (< 1: the variant is
  faster; MoT-style "step matching");
- `flops_fraction(...)`: η, the fraction of the baseline's training FLOPs the variant needs to reach the
  baseline's final (smoothed) loss (MoT "55.8% of the FLOPs"; MoMa's "3.7x savings" is 1/η);
- `compare(baseline, variant)`: both, and the final loss difference, per modality, on training and
  validation loss (only training losses are smoothed); `compare_seeds` pairs seeds and adds intervals.

Training FLOPs at step s are cumulative: Σ steps × tokens per step (train.batch_size × train.seq_len) ×
`flops_per_token` as logged. The x-axis is the model's total training FLOPs for every modality's loss, as
in the papers. Not reaching the baseline's loss is `None` (rendered "not reached"), never a number.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Sequence

import numpy as np

from moma import metrics

NOT_REACHED = "not reached"
# Config fields two runs must share to be compared (their losses are over the same tokens).
_SAME_DATA_FIELDS = ("data", "model.vocab_size", "model.modalities")


def config_value(config: dict, dotted: str, default: Any = KeyError) -> Any:
  """`config_value(cfg, "train.steps")` on nested dicts (config.json); `default` if absent."""
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      if default is KeyError:
        raise KeyError(dotted)
      return default
    node = node[part]
  return node


@dataclasses.dataclass(frozen=True)
class Run:
  path: pathlib.Path
  config: dict
  records: list[dict]

  @property
  def name(self) -> str:
    """The directory name; a seed of a sweep's seeded run is `RUN/seed=K`."""
    return f"{self.path.parent.name}/{self.path.name}" if self.path.name.startswith("seed=") else self.path.name

  @property
  def seed(self) -> int:
    return int(config_value(self.config, "train.seed", 0))

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(config_value(self.config, "model.modalities", ()))

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that log `key` as a finite number."""
    pairs = [(r["step"], r[key]) for r in self.records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    steps, values = zip(*pairs) if pairs else ((), ())
    return np.asarray(steps, float), np.asarray(values, float)

  @property
  def finished(self) -> bool:
    """Whether it logged its last step (train.steps); a run still in progress is not finished."""
    steps = config_value(self.config, "train.steps", None)
    return steps is not None and _reached(self.records, steps)

  def tokens_per_step(self) -> int:
    try:
      return int(config_value(self.config, "train.batch_size")) * int(
          config_value(self.config, "train.seq_len"))
    except KeyError as e:
      raise ValueError(f"{self.path}/config.json has no {e.args[0]}; tokens per step need "
                       "train.batch_size and train.seq_len") from None


def load_run(run_dir: str | pathlib.Path) -> Run:
  path = pathlib.Path(run_dir)
  config_path = path / "config.json"
  if not config_path.exists():
    raise ValueError(f"{config_path} does not exist; pass run directories written by moma.main")
  return Run(path, json.loads(config_path.read_text()), metrics.read(path))


def load_group(path: str | pathlib.Path) -> list[Run]:
  """A run directory → [its run]; a seeded run's directory (`seed=K/` run directories, as
  `experiments/sweep.py NAME:seeds=N` writes them) → its runs in seed order."""
  path = pathlib.Path(path)
  if (path / "config.json").exists():
    return [load_run(path)]
  seeds = [p for p in path.glob("seed=*") if (p / "config.json").exists()]
  if not seeds:
    raise ValueError(f"{path} holds neither config.json nor seed=K run directories; pass run directories "
                     "written by moma.main, or a seeded sweep run's directory")
  return sorted((load_run(p) for p in seeds), key=lambda run: run.seed)


def last_step(run_dir: str | pathlib.Path) -> int | None:
  steps = [r["step"] for r in metrics.read(run_dir) if "step" in r]
  return max(steps) if steps else None


def _reached(records: Sequence[dict], steps: int) -> bool:
  """Whether metrics records log a step >= `steps` (the trainer logs its last step whatever log_every is)."""
  return any(r.get("step", -1) >= int(steps) for r in records)


def is_finished(run_dir: str | pathlib.Path, steps: int | None = None) -> bool:
  """Finished ⇔ metrics.jsonl logs a step ≥ `steps` (default: train.steps from config.json).

  Needs no marker file, so runs launched by a cluster scheduler are recognised the same way; it relies on
  the trainer logging its last step whatever log_every is (as the flax examples do).
  """
  path = pathlib.Path(run_dir)
  if steps is None:
    if not (path / "config.json").exists():
      return False
    steps = config_value(json.loads((path / "config.json").read_text()), "train.steps", None)
    if steps is None:
      raise ValueError(f"{path}/config.json has no train.steps; pass the expected steps explicitly")
  return _reached(metrics.read(path), steps)


def flops_per_token(record: dict, modalities: Sequence[str]) -> float | None:
  """A record's FLOPs per token: a number, else the mean of per-modality values (a dict under
  `flops_per_token` or `flops_per_token/<modality>` keys) weighted by `tokens/<modality>` when logged."""
  value = record.get("flops_per_token")
  if isinstance(value, (int, float)):
    return float(value)
  per_mod = dict(value) if isinstance(value, dict) else {
      m: record[f"flops_per_token/{m}"] for m in modalities if f"flops_per_token/{m}" in record}
  if not per_mod:
    return None
  weights = {m: float(record.get(f"tokens/{m}", 1.0)) for m in per_mod}
  return sum(per_mod[m] * weights[m] for m in per_mod) / sum(weights.values())


def cumulative_flops(run: Run, steps: np.ndarray) -> np.ndarray:
  """Training FLOPs spent by each of `steps`; FLOPs per token as logged at the end of each interval."""
  logged = [(r["step"], f) for r in run.records
            if (f := flops_per_token(r, run.modalities)) is not None]
  if not logged:
    raise ValueError(f"{run.path}/metrics.jsonl logs no flops_per_token; FLOPs-matched metrics need it")
  knots = np.concatenate([[0.0], [s for s, _ in logged]])
  fpt = np.asarray([f for _, f in logged])
  cum = np.concatenate([[0.0], np.cumsum(np.diff(knots) * fpt)]) * run.tokens_per_step()
  steps = np.asarray(steps, float)
  beyond = steps > knots[-1]
  return np.where(beyond, cum[-1] + (steps - knots[-1]) * fpt[-1] * run.tokens_per_step(),
                  np.interp(steps, knots, cum))


def summarize(run: Run) -> dict[str, Any]:
  """Results-table row: last logged value of every loss, median throughput, FLOPs per token and total."""
  row: dict[str, Any] = {"last_step": None}
  if not run.records:
    return row
  row["last_step"] = max(r["step"] for r in run.records)
  keys = [k for r in run.records for k in r if k == "loss" or k.startswith(("loss/", "eval/loss"))]
  for key in dict.fromkeys(keys):
    _, values = run.series(key)
    if len(values):
      row[key] = float(values[-1])
  _, tps = run.series("tokens_per_s")
  if len(tps):
    row["tokens_per_s"] = float(np.median(tps[1:] if len(tps) > 1 else tps))  # first log pays compile
  fpt = [f for r in run.records if (f := flops_per_token(r, run.modalities)) is not None]
  if fpt:
    row["flops_per_token"] = fpt[-1]
    row["train_flops"] = float(cumulative_flops(run, np.asarray([row["last_step"]]))[0])
  return row


def check_comparable(runs: Sequence[Run]) -> None:
  """Raise one ValueError when runs were trained or evaluated on different data or vocabularies."""
  first = runs[0]
  for run in runs[1:]:
    for field in _SAME_DATA_FIELDS:
      a, b = config_value(first.config, field, None), config_value(run.config, field, None)
      if a != b:
        raise ValueError(f"runs {first.path} and {run.path} differ in config field {field!r} "
                         f"({a!r} vs {b!r}); FLOPs-matched comparisons need the same data and vocabulary")


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average over `window` logged points (odd; shrinks at the ends): no lag, so step
  matching is not biased by it."""
  if window < 1 or window % 2 == 0:
    raise ValueError(f"smooth window must be a positive odd number of logged points, got {window}")
  half = window // 2
  c = np.concatenate([[0.0], np.cumsum(values)])
  idx = np.arange(len(values))
  lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(values))
  return (c[hi] - c[lo]) / (hi - lo)


def first_reach(x: np.ndarray, loss: np.ndarray, target: float) -> float | None:
  """First x at which `loss` falls to `target`, linearly interpolated between logged points."""
  below = np.nonzero(loss <= target)[0]
  if not len(below):
    return None
  i = below[0]
  if i == 0:
    return float(x[0])
  t = (loss[i - 1] - target) / (loss[i - 1] - loss[i])
  return float(x[i - 1] + t * (x[i] - x[i - 1]))


def step_matching(base_steps, base_loss, var_steps, var_loss, window: int = 1) -> dict[str, Any]:
  """Pairs (baseline step, variant step at the same smoothed loss) and their slope through the origin.

  Baseline losses the variant is already below at its first logged step are left out (the match is
  earlier than anything logged), as are those it never reaches; `ratio` is None when nothing matches.
  """
  base_s, var_s = smooth(np.asarray(base_loss, float), window), smooth(np.asarray(var_loss, float), window)
  pairs = []
  for step, target in zip(base_steps, base_s):
    if target < var_s[0] and (match := first_reach(np.asarray(var_steps, float), var_s, target)) is not None:
      pairs.append((float(step), match))
  if not pairs:
    return {"ratio": None, "pairs": [], "matched": 0, "of": len(base_s)}
  b, v = np.asarray(pairs).T
  return {"ratio": float(b @ v / (b @ b)), "pairs": pairs, "matched": len(pairs), "of": len(base_s)}


def flops_fraction(base_flops, base_loss, var_flops, var_loss, window: int = 1) -> float | None:
  """η: variant FLOPs to reach the baseline's final smoothed loss / baseline's total FLOPs (None: never)."""
  target = smooth(np.asarray(base_loss, float), window)[-1]
  reach = first_reach(np.asarray(var_flops, float), smooth(np.asarray(var_loss, float), window), target)
  return None if reach is None else reach / float(base_flops[-1])


def loss_keys(run: Run) -> dict[str, list[tuple[str, str]]]:
  """{split: [(modality or "all", metrics key)]} for the training and validation losses the run logs."""
  present = {k for r in run.records for k in r}
  keys = {}
  for split, prefix in (("train", "loss"), ("eval", "eval/loss")):
    candidates = [("all", prefix)] + [(m, f"{prefix}/{m}") for m in run.modalities]
    keys[split] = [(m, k) for m, k in candidates if k in present]
  return keys


def compare(baseline: Run, variant: Run, window: int = 1) -> list[dict[str, Any]]:
  """Step-matching ratio and η of `variant` against `baseline`, per split and modality both runs log, and
  `final_loss_delta`: the variant's last (smoothed) loss minus the baseline's (< 0: it ends lower), at
  their last logged steps, i.e. at equal tokens when they train as long."""
  check_comparable([baseline, variant])
  rows = []
  variant_keys = {k for pairs in loss_keys(variant).values() for _, k in pairs}
  for split, pairs in loss_keys(baseline).items():
    for modality, key in pairs:
      if key not in variant_keys:
        continue
      (bs, bl), (vs, vl) = baseline.series(key), variant.series(key)
      w = _window(split, window, min(len(bl), len(vl)))
      ratio = step_matching(bs, bl, vs, vl, w)
      eta = flops_fraction(cumulative_flops(baseline, bs), bl, cumulative_flops(variant, vs), vl, w)
      rows.append({"variant": variant.name, "split": split, "modality": modality,
                   "step_ratio": ratio["ratio"], "matched_steps": f"{ratio['matched']}/{ratio['of']}",
                   "flops_fraction": eta, "savings": None if eta is None else 1.0 / eta,
                   "final_loss_delta": float(smooth(vl, w)[-1] - smooth(bl, w)[-1])})
  return rows


def _window(split: str, window: int, num_points: int) -> int:
  """Smooth training losses only (validation losses are on a fixed set, already low-noise), and never
  over more points than are logged."""
  if split != "train":
    return 1
  return min(window, max(1, num_points if num_points % 2 else num_points - 1))


def interval95(values: Sequence[float]) -> list[float] | None:
  """The 95% Student-t interval of the mean of `values` (one per seed); None for fewer than two."""
  if len(values) < 2:
    return None
  from scipy import stats  # pylint: disable=g-import-not-at-top
  values = np.asarray(values, float)
  half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
  return [float(values.mean() - half), float(values.mean() + half)]


def compare_seeds(baselines: Sequence[Run], variants: Sequence[Run], window: int = 1,
                  name: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """`compare` of each variant seed against the baseline run of the same train.seed (same data order),
  then per split and modality across seeds: the mean step-matching ratio, η and final loss delta with their
  95% intervals (`interval95`; None below two seeds), `reached` = seeds in which the variant reaches the
  baseline's final loss (η and its interval are over those). Only pairs of finished runs count: a run in progress
  would read as "not reached" or shift the mean; its seed is listed under `unfinished_seeds`. (To look at a run
  in progress, `compare` it directly.) Returns (rows across seeds, rows per seed)."""
  by_seed = {run.seed: run for run in baselines}
  name = name or variants[0].name.split("/")[0]
  common = [(by_seed[v.seed], v) for v in variants if v.seed in by_seed]
  if not common:
    raise ValueError(f"{name}: no train.seed in common with the baseline (seeds {sorted(v.seed for v in variants)}"
                     f" vs {sorted(by_seed)}); train the baseline with the variant's seeds")
  pairs = [(b, v) for b, v in common if b.finished and v.finished]
  unfinished = sorted(v.seed for b, v in common if not (b.finished and v.finished))
  if not pairs:
    raise ValueError(f"{name}: no seed where both it and the baseline finished (in progress: seeds {unfinished});"
                     " wait for them, or pass studies.compare two runs to look at one as it stands")
  per_seed = [dict(row, variant=name, seed=v.seed) for b, v in pairs for row in compare(b, v, window)]
  rows = []
  for split, modality in dict.fromkeys((r["split"], r["modality"]) for r in per_seed):
    seeds = [r for r in per_seed if (r["split"], r["modality"]) == (split, modality)]
    ratios = [r["step_ratio"] for r in seeds if r["step_ratio"] is not None]
    etas = [r["flops_fraction"] for r in seeds if r["flops_fraction"] is not None]
    eta = float(np.mean(etas)) if etas else None
    deltas = [r["final_loss_delta"] for r in seeds]
    rows.append({"variant": name, "split": split, "modality": modality, "seeds": len(seeds),
                 "step_ratio": float(np.mean(ratios)) if ratios else None, "step_ratio_ci95": interval95(ratios),
                 "flops_fraction": eta, "flops_fraction_ci95": interval95(etas),
                 "reached": f"{len(etas)}/{len(seeds)}", "savings": None if eta is None else 1.0 / eta,
                 "final_loss_delta": float(np.mean(deltas)), "final_loss_delta_ci95": interval95(deltas),
                 "unfinished_seeds": ",".join(map(str, unfinished))})
  return rows, per_seed


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown table over the union of the rows' keys; None renders as "not reached"."""
  columns = list(dict.fromkeys(k for r in rows for k in r))
  def cell(v, column):
    if v is None:
      return "—" if column.endswith("_ci95") else NOT_REACHED
    if isinstance(v, list):  # an interval
      return "–".join(f"{x:.3g}" for x in v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r[c], c) if c in r else "" for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def plot_loss_vs_flops(baseline: Run, variants: Sequence[Run], out_dir: str | pathlib.Path,
                       window: int = 1) -> list[pathlib.Path]:
  """One PNG per split: a panel per modality, loss vs training FLOPs (log x) for every run, with the
  baseline's final loss dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for split, pairs in loss_keys(baseline).items():
    if not pairs:
      continue
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 3.6), squeeze=False)
    for ax, (modality, key) in zip(axes[0], pairs):
      for run in [baseline, *variants]:
        steps, loss = run.series(key)
        if len(loss):
          ax.plot(cumulative_flops(run, steps), smooth(loss, _window(split, window, len(loss))),
                  label=run.name, lw=2 if run is baseline else 1.2)
      _, base_loss = baseline.series(key)
      ax.axhline(smooth(base_loss, _window(split, window, len(base_loss)))[-1], color="gray", ls="--",
                 lw=0.8)
      ax.set(xscale="log", xlabel="training FLOPs", ylabel=key, title=f"{split}: {modality}")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"loss_vs_flops_{split}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths
