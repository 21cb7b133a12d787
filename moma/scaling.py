"""Scaling laws from run directories: validation loss vs training FLOPs, L(C) = E + A·C^(−α), per
architecture and modality, with bootstrap intervals over runs and seeds, and η(C) against a baseline.

- Two fits per architecture and modality (`eval/loss` is "all", `eval/loss/<m>` each modality):
  "final" on each run's last validation loss, "curve" on every validation row of every run.
- The fit is Chinchilla's approach 3 (Hoffmann et al. 2022, appendix D.2): minimise Σ Huber_δ(log L̂ − log L)
  over (log A, log E, α) with L-BFGS-B, started from the best points of a grid; δ = 1e-3. C is divided by
  the data's geometric mean while fitting (conditioning); A is reported for C in FLOPs.
- Intervals: percentile bootstrap. Each replicate draws pairing keys (d_model, train.seed) with
  replacement and every architecture refits on its runs of the drawn keys (a run whole, with its curve),
  so baseline and variant resample together where their seeds and sizes pair. A replicate that leaves an
  architecture fewer than 3 distinct budgets is not counted (`replicates_fitted` says how many were).
- η(C) = C_var(L_base(C)) / C: the fraction of the baseline's compute at which the variant's law reaches
  the baseline's loss at C (NaN where that loss is at or below the variant's E). Computed in a form that
  is exactly 1 for identical laws (`eta`).

The architecture of a run is read from config.json's model fields (`architecture`), not from directory
names: dense, mot (every component untied), mot_<components>, moma_<layout> / moe_<N>shared (MoE FFN;
`_topk`, `_mod` suffixes), mamba, mom (the four projections untied), mom_<components>.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
from typing import Any, Sequence

import numpy as np
from scipy import optimize
from scipy import special
import threadpoolctl

from moma import studies
from moma.models.model_config import MAMBA_PROJECTIONS, UNTIE_COMPONENTS

HUBER_DELTA = 1e-3
NUM_PARAMS = 3  # E, A, α
KINDS = ("final", "curve")
# The papers' compute budgets, C = 6·N·D (training FLOPs), for extrapolation far outside the CPU data.
BUDGETS = {
    # MoMa (Lin et al. 2024, arXiv 2407.21770, abstract): 1.4B parameters, "a 1-trillion-token training budget".
    "MoMa 1.4B, 1T tokens": 6 * 1.4e9 * 1e12,
    # MoT (Liang et al. 2024, arXiv 2411.04996): Chameleon 7B. Its token count is not checked here; D is this
    # repo's 7B preset (configs/common.py: batch 1024 × 4096 tokens × 100k steps = 4.2e11 tokens).
    "MoT 7B, 0.42T tokens": 6 * 7e9 * 1024 * 4096 * 100_000,
}
_GRID_ALPHA = (0.05, 0.2, 0.5, 1.0, 2.0)
_GRID_E_FRACTION = (0.1, 0.5, 0.9)  # E as a share of the lowest loss
_GRID_LOG_A = (-3.0, -1.0, 1.0)  # at C = the data's geometric mean
_STARTS = 3  # L-BFGS-B runs from the best grid points


def architecture(config: dict) -> str:
  """The architecture label of a run's config.json (see the module docstring)."""
  model = config.get("model", {})
  untie = tuple(model.get("untie", ()))
  if model.get("block", "transformer") == "mamba":
    family, everything = "mom", MAMBA_PROJECTIONS
  else:
    family = "mot"
    everything = tuple(c for c in UNTIE_COMPONENTS["transformer"] if c != "qk_norm" or model.get("qk_norm"))
  if not untie:
    label = "mamba" if family == "mom" else "dense"
  else:
    label = family if set(untie) == set(everything) else f"{family}_{'+'.join(untie)}"
  if model.get("ffn") == "moe":
    moe = model.get("moe", {})
    layout = str(moe.get("layout", ""))
    label = ("moe_" if "shared" in layout else "moma_") + layout + ("" if label == "dense" else f"_{label}")
    label += "_topk" if moe.get("routing", "ec") != "ec" else ""
    label += "_mod" if model.get("mod", {}).get("enabled") else ""
  return label


def eval_key(modality: str) -> str:
  return "eval/loss" if modality == "all" else f"eval/loss/{modality}"


def size_label(config: dict) -> str:
  model = config.get("model", {})
  return f"d{model.get('d_model', '?')}x{model.get('num_layers', '?')}"


def family_baseline(arch: str, baseline: str, present: Sequence[str]) -> str:
  """The baseline an architecture is compared with: "mamba" for the Mixture-of-Mamba family when present."""
  mixture_of_mamba = arch == "mom" or arch.startswith("mom_")  # not moma_*, a transformer
  return "mamba" if mixture_of_mamba and "mamba" in present else baseline


@dataclasses.dataclass(frozen=True)
class Law:
  """L(C) = E + exp(log_A) · C^(−alpha), C in training FLOPs."""
  E: float
  log_A: float
  alpha: float

  @property
  def A(self) -> float:
    return math.exp(self.log_A)

  def __call__(self, flops) -> np.ndarray:
    return self.E + np.exp(self.log_A - self.alpha * np.log(np.asarray(flops, float)))


def eta(base: Law, variant: Law, flops) -> np.ndarray:
  """η(C) = C_var(L_base(C)) / C. The variant reaches loss L at (A_v / (L − E_v))^(1/α_v); with
  L − E_v = ΔE + A_b·C^(−α_b) = e^z·(1 + ΔE·e^(−z)), ΔE = E_b − E_v, z = log A_b − α_b·log C:
  log η = ((log A_v − log A_b) − (α_v − α_b)·log C − log1p(ΔE·e^(−z))) / α_v, which is exactly 0 for
  identical laws. NaN where L_base(C) ≤ E_v (the variant never gets there)."""
  log_c = np.log(np.asarray(flops, float))
  z = base.log_A - base.alpha * log_c
  ratio = (base.E - variant.E) * np.exp(-z)
  with np.errstate(invalid="ignore", divide="ignore"):
    log_eta = ((variant.log_A - base.log_A) - (variant.alpha - base.alpha) * log_c - np.log1p(ratio)) / variant.alpha
  return np.where(ratio > -1, np.exp(log_eta), np.nan)


def _objective(theta: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray) -> tuple[float, np.ndarray]:
  """Mean Huber loss (÷ δ) of log L̂ − log L and its gradient in θ = (log A, log E, α), x = C / C_ref."""
  a, e, alpha = theta
  power = a - alpha * log_x
  log_pred = np.logaddexp(power, e)
  residual = log_pred - log_loss
  share = np.exp(power - log_pred)  # ∂ log L̂ / ∂ log A
  slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA) / (HUBER_DELTA * len(residual))
  grad = np.array([slope @ share, slope @ (1 - share), -slope @ (share * log_x)])
  return float(special.huber(HUBER_DELTA, residual).sum() / (HUBER_DELTA * len(residual))), grad


def distinct_budgets(flops: np.ndarray) -> int:
  return len(np.unique(np.round(np.log(flops), 9)))


def fit_law(flops, loss, what: str = "fit") -> Law:
  """Chinchilla approach 3 on points (C, L). Raises ValueError (naming `what`) below 3 distinct budgets."""
  flops, loss = np.asarray(flops, float), np.asarray(loss, float)
  if distinct_budgets(flops) < NUM_PARAMS:
    raise ValueError(f"{what}: {distinct_budgets(flops)} distinct training budgets for {NUM_PARAMS} parameters "
                     "(E, A, alpha); add runs of other sizes")
  log_ref = float(np.mean(np.log(flops)))
  log_x, log_loss = np.log(flops) - log_ref, np.log(loss)
  grid = np.array([(a, math.log(f * loss.min()), al) for a, f, al in
                   itertools.product(_GRID_LOG_A, _GRID_E_FRACTION, _GRID_ALPHA)])
  scores = [_objective(theta, log_x, log_loss)[0] for theta in grid]
  bounds = [(None, None), (None, math.log(loss.max())), (1e-4, 4.0)]
  best = min((optimize.minimize(_objective, grid[i], args=(log_x, log_loss), jac=True, method="L-BFGS-B",
                                bounds=bounds, options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
              for i in np.argsort(scores)[:_STARTS]), key=lambda r: r.fun)
  a, e, alpha = best.x
  return Law(E=math.exp(e), log_A=float(a + alpha * log_ref), alpha=float(alpha))


@dataclasses.dataclass(frozen=True)
class RunPoints:
  """One run's validation losses: {modality: (training FLOPs, loss)} at each eval row."""
  run: studies.Run
  arch: str
  key: tuple[Any, int]  # bootstrap pairing key: (d_model, train.seed)
  curves: dict[str, tuple[np.ndarray, np.ndarray]]

  def points(self, modality: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    flops, loss = self.curves[modality]
    return (flops[-1:], loss[-1:]) if kind == "final" else (flops, loss)


def run_points(run: studies.Run) -> RunPoints:
  curves = {}
  for modality, key in studies.loss_keys(run)["eval"]:
    steps, loss = run.series(key)
    flops = studies.cumulative_flops(run, steps)
    curves[modality] = (flops[flops > 0], loss[flops > 0])  # an eval before the first step has no budget
  if "all" not in curves or not len(curves["all"][0]):
    raise ValueError(f"{run.path}: metrics.jsonl has no validation rows (eval/loss); leave the run out, or "
                     "wait until it logs one (every train.eval_every steps)")
  return RunPoints(run, architecture(run.config), (studies.config_value(run.config, "model.d_model", None),
                                                   run.seed), curves)


@dataclasses.dataclass
class Fit:
  arch: str
  modality: str
  kind: str
  law: Law
  replicates: list  # Law, or None where the replicate could not be fitted


def _pooled(runs: Sequence[RunPoints], modality: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
  pairs = [r.points(modality, kind) for r in runs] or [(np.ones(0), np.ones(0))]
  return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def interval(values) -> list[float] | None:
  """The 95% percentile interval of the finite `values`; None when none is finite."""
  values = np.asarray(values, float)
  values = values[np.isfinite(values)]
  return None if not len(values) else [float(v) for v in np.percentile(values, [2.5, 97.5])]


@dataclasses.dataclass
class Study:
  runs: list[RunPoints]
  fits: dict[tuple[str, str, str], Fit]  # (kind, arch, modality) → Fit
  baseline: str

  @property
  def archs(self) -> list[str]:
    return list(dict.fromkeys(r.arch for r in self.runs))

  def comparisons(self) -> list[tuple[str, str]]:
    """(variant, its baseline) for every architecture but the baseline."""
    return [(a, family_baseline(a, self.baseline, self.archs)) for a in self.archs if a != self.baseline]

  def flops_grid(self, num: int = 5) -> np.ndarray:
    """Budgets spanning the runs' final training FLOPs."""
    finals = [r.curves["all"][0][-1] for r in self.runs]
    return np.geomspace(min(finals), max(finals), num)


def fit_study(runs: Sequence[studies.Run], baseline: str = "dense", replicates: int = 200,
              seed: int = 0) -> Study:
  """Every architecture × modality × fit kind, with `replicates` paired bootstrap refits (fixed `seed`)."""
  studies.check_comparable(runs)
  points = [run_points(run) for run in runs]
  archs = list(dict.fromkeys(p.arch for p in points))
  if baseline not in archs:
    raise ValueError(f"baseline architecture {baseline!r} is not among the runs' ({', '.join(archs)}); "
                     "pass --baseline one of them")
  keys = sorted(set(p.key for p in points), key=str)
  draws = np.random.default_rng(seed).integers(0, len(keys), (replicates, len(keys)))
  cells = [(kind, arch, modality) for arch in archs for modality in dict.fromkeys(
      m for p in points if p.arch == arch for m in p.curves) for kind in KINDS]
  # One BLAS thread: L-BFGS-B on 3 parameters runs ~50x slower among the threads of a loaded machine.
  with threadpoolctl.threadpool_limits(1):
    laws = {cell: _fit_cell(points, *cell) for cell in cells}  # bad input fails before the bootstrap
    fits = {}
    for (kind, arch, modality), law in laws.items():
      by_key = {k: [p for p in points if p.arch == arch and p.key == k and modality in p.curves] for k in keys}
      boot = []
      for draw in draws:
        flops, loss = _pooled([p for i in draw for p in by_key[keys[i]]], modality, kind)
        boot.append(fit_law(flops, loss) if distinct_budgets(flops) >= NUM_PARAMS else None)
      fits[(kind, arch, modality)] = Fit(arch, modality, kind, law, boot)
  return Study(points, fits, baseline)


def _fit_cell(points: Sequence[RunPoints], kind: str, arch: str, modality: str) -> Law:
  logged = [p for p in points if p.arch == arch and modality in p.curves]
  what = (f"architecture {arch}, {eval_key(modality)}, {kind} fit "
          f"(runs {', '.join(str(p.run.path) for p in logged)})")
  return fit_law(*_pooled(logged, modality, kind), what)


def _eta_cells(base: Fit, variant: Fit, flops) -> list[dict[str, Any]]:
  """Per budget of `flops`: η of the two laws (None: not reached), its interval over the paired bootstrap
  replicates, and `reached`: in how many of the replicates both fitted the variant reaches the loss."""
  point = eta(base.law, variant.law, flops)
  boot = np.array([eta(b, v, flops) for b, v in zip(base.replicates, variant.replicates) if b and v])
  boot = boot.reshape(len(boot), len(point))
  return [{"eta": float(p) if np.isfinite(p) else None, "eta_ci95": interval(boot[:, i]),
           "reached": f"{int(np.isfinite(boot[:, i]).sum())}/{len(boot)}"} for i, p in enumerate(point)]


def law_rows(study: Study) -> list[dict[str, Any]]:
  rows = []
  for (kind, arch, modality), fit in study.fits.items():
    mine = [r for r in study.runs if r.arch == arch]
    done = [law for law in fit.replicates if law]
    rows.append({"kind": kind, "architecture": arch, "modality": modality, "runs": len(mine),
                 "sizes": " ".join(dict.fromkeys(size_label(r.run.config) for r in mine)),
                 "E": fit.law.E, "E_ci95": interval([l.E for l in done]),
                 "A": fit.law.A, "A_ci95": interval([l.A for l in done]),
                 "alpha": fit.law.alpha, "alpha_ci95": interval([l.alpha for l in done]),
                 "replicates_fitted": f"{len(done)}/{len(fit.replicates)}"})
  return rows


def eta_rows(study: Study, flops) -> list[dict[str, Any]]:
  """η of every variant against its baseline at each of `flops`, per fit kind and modality."""
  rows = []
  for kind, (variant, base_arch) in itertools.product(KINDS, study.comparisons()):
    for modality in [m for (k, a, m) in study.fits if k == kind and a == variant]:
      base, var = study.fits.get((kind, base_arch, modality)), study.fits[(kind, variant, modality)]
      if base is None:
        continue
      rows += [{"kind": kind, "variant": variant, "baseline": base_arch, "modality": modality, "flops": float(c),
                **cell} for c, cell in zip(flops, _eta_cells(base, var, flops))]
  return rows


def extrapolation_rows(study: Study, budgets: dict[str, float] = BUDGETS) -> list[dict[str, Any]]:
  """Each law's predicted loss, and η against its baseline, at the papers' budgets: extrapolations far
  outside the data, with the bootstrap's spread (not a bare number)."""
  rows = []
  for (kind, arch, modality), fit in study.fits.items():
    base = study.fits.get((kind, family_baseline(arch, study.baseline, study.archs), modality))
    for name, flops in budgets.items():
      row = {"kind": kind, "architecture": arch, "modality": modality, "budget": name, "flops": flops,
             "loss": float(fit.law(flops)), "loss_ci95": interval([l(flops) for l in fit.replicates if l])}
      if base is not None and base is not fit:
        row.update(baseline=base.arch, **_eta_cells(base, fit, [flops])[0])
      rows.append(row)
  return rows


def plot(study: Study, out_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """One PNG per modality: validation loss vs training FLOPs (log x), every eval row (small), each run's
  final point (large), the final fit (solid) and curve fit (dashed), one colour per architecture."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  colours = dict(zip(study.archs, itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])))
  paths = []
  for modality in dict.fromkeys(m for (_, _, m) in study.fits):
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arch in study.archs:
      mine = [r for r in study.runs if r.arch == arch and modality in r.curves]
      if not mine:
        continue
      c = colours[arch]
      for kind, marker, size in (("curve", ".", 12), ("final", "o", 36)):
        ax.scatter(*_pooled(mine, modality, kind), s=size, marker=marker, color=c,
                   alpha=0.35 if kind == "curve" else 0.9)
      flops = np.geomspace(min(r.curves[modality][0].min() for r in mine),
                           max(r.curves[modality][0].max() for r in mine), 100)
      for kind, style in (("final", "-"), ("curve", "--")):
        fit = study.fits[(kind, arch, modality)]
        ax.plot(flops, fit.law(flops), style, color=c,
                label=f"{arch} {kind}: α={fit.law.alpha:.2f}, E={fit.law.E:.3g}")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="validation loss", title=eval_key(modality))
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"scaling_{modality}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths
