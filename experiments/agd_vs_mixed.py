"""AGD vs mixed batches on the same tasks, at equal examples, FLOPs and optimizer steps.

(a) AGD: round-robin over T tasks; each step one task's full batch (B_t examples) through its own
    compiled step (`agd.plan`).
(b) Mixed: every step holds all T tasks, each with B_t / T examples, in one compiled step (the sum of the
    weighted losses; `agd.mixed_plan`).
Over N steps both see the same examples of every task (N/T · B_t) and so the same FLOPs. Both arms are runs
of the trainer's loop (`loop.run`) from the same initial state (config.train.seed) with the same optimizer;
validation metrics per task at full batch size, from each run's last checkpoint.

  python -m experiments.agd_vs_mixed [--steps=240] [--out=experiments/out]

Writes a markdown table (stdout and OUT/agd_vs_mixed.md), OUT/agd_vs_mixed.png (per-task training loss
against examples seen); the last stdout line is a JSON object.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import flags
import jax
import matplotlib
import numpy as np

from configs import agd as agd_config
from moma import agd
from moma import checkpoint
from moma import cli
from moma import loop
from moma import metrics
from moma import sharding
from moma import train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

_STEPS = flags.DEFINE_integer("steps", 240, "Optimizer steps per arm (a multiple of the task count).")
_OUT = flags.DEFINE_string("out", "experiments/out", "Directory for the table and the plot.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "Validation batches per task.")

# compilations; train_s: the steps' time as the loop measures it (compilation excluded); wall_s: whole runs.
TIMING = ("compilations", "train_s", "wall_s")
TASKS = dict(  # name: (objective, mixture, batch size, task_config kwargs); batch sizes divisible by 4
    captioning=("captioning", ("image_caption",), 8, dict(seq_len=112)),
    image_gen=("image_generation", ("caption_image",), 8, dict(seq_len=112)),
    digits8=("classification", ("image_caption",), 32, dict(image_size=8)),
    clip16=("contrastive", ("image_caption",), 16, dict(image_size=16, seq_len=40)),
)


def make_config(steps: int, batch_divisor: int = 1):
  config = agd_config.get_config("size=tiny,untie=all,schedule=round_robin")
  config.data.text_max_bytes = 40
  # One row per round of the T tasks; one checkpoint, the last, for the evaluation.
  config.train.update(steps=steps, progress_bar=False, eval_every=0, log_every=len(TASKS),
                      eval_steps=_EVAL_BATCHES.value)
  config.checkpoint.update(every_steps=steps, async_save=False)
  config.agd.tasks = {
      name: agd.task_config(objective, mixture, batch_size=batch // batch_divisor, **kwargs)
      for name, (objective, mixture, batch, kwargs) in TASKS.items()}
  return train.resolve_config(config)


def run_arm(config, plan, workdir):
  """Trains `plan` in `workdir`: (per-task training curves [(examples seen, loss)], timing)."""
  t0 = time.perf_counter()
  final = loop.run(config, workdir, plan)
  wall_s = time.perf_counter() - t0
  curves, train_s, last = {name: [] for name in TASKS}, 0.0, 0
  for row in (r for r in metrics.read(workdir) if "tokens_per_s" in r):
    tokens = sum(plan.tasks[plan.task_at(s)].tokens for s in range(last, row["step"]))
    train_s, last = train_s + tokens / row["tokens_per_s"], row["step"]  # the loop's step time
    for name, (_, _, batch, _) in TASKS.items():  # a row is one round: B_t examples of each task, either arm
      curves[name].append(((len(curves[name]) + 1) * batch, row[f"task/{name}/loss"]))
  return curves, dict(compilations=final["compilations"], train_s=train_s, wall_s=wall_s)


def evaluate(config, workdir):
  """Validation metrics of every task at `config`'s (full) batch sizes on `workdir`'s last params."""
  plan = agd.plan(config)
  params = checkpoint.restore_params(workdir, "workdir")
  with sharding.activate(plan.mesh, plan.rules):
    row = plan.evaluate(params)
  return {name: {metric: row[f"eval/task/{name}/{metric}"] for metric in ("loss", "accuracy")
                 if f"eval/task/{name}/{metric}" in row} for name in TASKS}


def main(argv):
  del argv
  num_steps = _STEPS.value
  full, mixed = make_config(num_steps), make_config(num_steps, batch_divisor=len(TASKS))
  results, curves = {}, {}
  with tempfile.TemporaryDirectory() as runs:
    for arm, config, make_plan in (("agd", full, agd.plan), ("mixed", mixed, agd.mixed_plan)):
      workdir = os.path.join(runs, arm)
      curves[arm], timing = run_arm(config, make_plan(config), workdir)
      results[arm] = dict(eval=evaluate(full, workdir), **timing)

  lines = [f"Tasks: {', '.join(f'{n} ({o}, batch {b})' for n, (o, _, b, _) in TASKS.items())}; "
           f"{num_steps} steps per arm, tiny MoT (configs/agd.py:size=tiny, d_model 64, 2 layers), "
           f"{jax.devices()[0].device_kind}.", "",
           "| task | metric | AGD | mixed |", "|---|---|---|---|"]
  for name in TASKS:
    for metric in results["agd"]["eval"][name]:
      a, m = results["agd"]["eval"][name][metric], results["mixed"]["eval"][name][metric]
      lines.append(f"| {name} | val {metric} | {a:.3f} | {m:.3f} |")
  for key in TIMING:
    lines.append(f"| all | {key} | {results['agd'][key]:.3g} | {results['mixed'][key]:.3g} |")
  table = "\n".join(lines)
  print(table)

  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "agd_vs_mixed.md"), "w") as f:
    f.write(table + "\n")
  fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.2))
  for ax, name in zip(axes, TASKS):
    for arm in ("agd", "mixed"):
      x, y = np.array(curves[arm][name]).T
      k = max(1, len(y) // 20)  # moving average: the per-round losses are noisy
      ax.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), label=arm)
    ax.set(title=name, xlabel="examples seen", ylabel="train loss")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, "agd_vs_mixed.png"), dpi=100)
  print(json.dumps({arm: {"eval": r["eval"], **{k: r[k] for k in TIMING}} for arm, r in results.items()}))


if __name__ == "__main__":
  cli.run(main)
