"""AGD vs mixed batches on the same tasks, at equal examples, FLOPs and optimizer steps.

(a) AGD: round-robin over T tasks; each step one task's full batch (B_t examples) through its own
    compiled step.
(b) Mixed: every step holds all T tasks, each with B_t / T examples, in one compiled step (the sum of the
    weighted losses).
Over N steps both see the same examples of every task (N/T · B_t) and so the same FLOPs. Both start from
the same initial state and use the same optimizer. Validation metrics per task at full batch size.

  python -m experiments.agd_vs_mixed [--steps=240] [--out=experiments/out]

Writes a markdown table (stdout and OUT/agd_vs_mixed.md), OUT/agd_vs_mixed.png (per-task training loss
against examples seen); the last stdout line is a JSON object.
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import flags
import flax.linen as nn
import jax
import matplotlib
import numpy as np

from configs import agd as agd_config
from moma import agd
from moma import cli
from moma import loop
from moma import objectives
from moma import steps
from moma import train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

_STEPS = flags.DEFINE_integer("steps", 240, "Optimizer steps per arm (a multiple of the task count).")
_OUT = flags.DEFINE_string("out", "experiments/out", "Directory for the table and the plot.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "Validation batches per task.")

TASKS = dict(  # name: (objective, mixture, batch size, task_config kwargs); batch sizes divisible by 4
    captioning=("captioning", ("image_caption",), 8, dict(seq_len=112)),
    image_gen=("image_generation", ("caption_image",), 8, dict(seq_len=112)),
    digits8=("classification", ("image_caption",), 32, dict(image_size=8)),
    clip16=("contrastive", ("image_caption",), 16, dict(image_size=16, seq_len=40)),
)


def make_config(steps: int, batch_divisor: int = 1):
  config = agd_config.get_config("size=tiny,untie=all,schedule=round_robin")
  config.data.text_max_bytes = 40
  config.train.update(steps=steps, progress_bar=False, eval_every=0)
  config.agd.tasks = {
      name: agd.task_config(objective, mixture, batch_size=batch // batch_divisor, **kwargs)
      for name, (objective, mixture, batch, kwargs) in TASKS.items()}
  return train.resolve_config(config)


def _sources(config, split):
  tasks = agd.tasks_from_config(config)
  return tasks, agd._data_sources(config, tasks, split)  # pylint: disable=protected-access


def run_agd(config, state):
  tasks, sources = _sources(config, "train")
  schedule = agd.Schedule.from_tasks("round_robin", tasks, config.train.seed)
  cache = loop.StepCache(functools.partial(agd.task_step, config))
  curves = {t.name: [] for t in tasks}
  compile_s = train_s = 0.0
  for step in range(config.train.steps):
    task = tasks[schedule.task_at(step)]
    batch = sources[task.name].batch(config.train.seed, step)
    t0 = time.perf_counter()
    first = task.name not in cache.traces
    state, out = cache(task, state, batch)
    loss = float(out["objective_loss"])  # waits for the device
    if first:
      compile_s += time.perf_counter() - t0
    else:
      train_s += time.perf_counter() - t0
    curves[task.name].append(((len(curves[task.name]) + 1) * task.batch_size, loss))
  return state, curves, dict(compile_s=compile_s, train_s=train_s, compilations=len(cache.traces))


def run_mixed(config, state):
  tasks, sources = _sources(config, "train")
  models = {t.name: agd.objective_model(config, t.objective) for t in tasks}
  step_fn = functools.partial(steps.train_step, model=agd.MixedModel(models),
                              loss_fn=agd.mixed_loss_fn(tasks), seed=config.train.seed,
                              modalities=tuple(config.model.modalities))
  batches = lambda step: {t.name: sources[t.name].batch(config.train.seed, step) for t in tasks}
  t0 = time.perf_counter()
  compiled = jax.jit(step_fn, donate_argnums=0).lower(state, batches(0)).compile()
  compile_s = time.perf_counter() - t0
  curves = {t.name: [] for t in tasks}
  t0 = time.perf_counter()
  for step in range(config.train.steps):
    state, out = compiled(state, batches(step))
    for t in tasks:
      curves[t.name].append(((step + 1) * t.batch_size, float(out[f"{t.name}/objective_loss"])))
  return state, curves, dict(compile_s=compile_s, train_s=time.perf_counter() - t0, compilations=1)


def evaluate(config, params, num_batches):
  tasks, sources = _sources(config, "validation")
  out = {}
  for t in tasks:
    fn = jax.jit(functools.partial(
        steps.eval_step, model=agd.objective_model(config, t.objective),
        loss_fn=functools.partial(objectives.loss_fn(t.objective), loss_weight=1.0),
        modalities=tuple(config.model.modalities)))
    rows = jax.device_get([fn(params, sources[t.name].batch(config.train.seed, i))
                           for i in range(num_batches)])
    out[t.name] = {k: float(np.mean([r[k] for r in rows])) for k in ("objective_loss", "accuracy")
                   if k in rows[0]}
  return out


def main(argv):
  del argv
  num_steps = _STEPS.value
  full = make_config(num_steps)
  mixed = make_config(num_steps, batch_divisor=len(TASKS))
  tasks, sources = _sources(full, "train")
  init_task = tasks[0]
  create = functools.partial(steps.create_state, full, agd.objective_model(full, init_task.objective))
  init = nn.unbox(jax.jit(create)(sources[init_task.name].batch(0, 0)))
  copy = lambda: jax.tree.map(lambda x: x.copy(), init)

  results, curves = {}, {}
  for arm, config, run in (("agd", full, run_agd), ("mixed", mixed, run_mixed)):
    state, curves[arm], timing = run(config, copy())
    results[arm] = dict(eval=evaluate(full, state.params, _EVAL_BATCHES.value), **timing)

  lines = [f"Tasks: {', '.join(f'{n} ({o}, batch {b})' for n, (o, _, b, _) in TASKS.items())}; "
           f"{num_steps} steps per arm, tiny MoT (configs/agd.py:size=tiny, d_model 64, 2 layers), "
           f"{jax.devices()[0].device_kind}.", "",
           "| task | metric | AGD | mixed |", "|---|---|---|---|"]
  for name in TASKS:
    for metric in results["agd"]["eval"][name]:
      a, m = results["agd"]["eval"][name][metric], results["mixed"]["eval"][name][metric]
      lines.append(f"| {name} | val {metric.replace('objective_', '')} | {a:.3f} | {m:.3f} |")
  for key in ("compilations", "compile_s", "train_s"):
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
      k = max(1, len(y) // 20)  # moving average: the per-step losses are noisy
      ax.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), label=arm)
    ax.set(title=name, xlabel="examples seen", ylabel="train loss")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, "agd_vs_mixed.png"), dpi=100)
  print(json.dumps({arm: {"eval": r["eval"], **{k: r[k] for k in ("compilations", "compile_s",
                                                                    "train_s")}}
                    for arm, r in results.items()}))


if __name__ == "__main__":
  cli.run(main)
