"""Alternating Gradient Descent (IMP, arXiv 2305.06324): one task per step, one compiled step per task.

A config with an `agd` section trains several tasks on one shared parameter tree and optimizer state:

  config.agd.schedule = "sample"       # or "round_robin"
  config.agd.num_classes = 10          # classification head width
  config.agd.tasks.<name> = agd.task_config(objective, mixture, batch_size, seq_len, ...)

Each step the schedule names a task (a pure function of (seed, step), so a resumed run continues the
same sequence); its batch (a pure function of (seed, task, step)) goes through that task's own compiled
train step, with its own shapes: no padding to a common shape, no recompiling after the first step.
`plan(config)` hands the tasks to the one training loop (moma/loop.py) that also runs plain LM
runs, built from the same pieces (moma/steps.py); `moma.models.encoder.Model` puts the decoder and the
encoder heads in one tree. Each task's `batch_size` is global (split over processes), like
`train.batch_size`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable

import jax
import ml_collections
import numpy as np

from moma import agd_data
from moma import console
from moma import faults
from moma import flops
from moma import loop
from moma import objectives
from moma import steps
from moma.models import encoder

SCHEDULES = ("sample", "round_robin")


@dataclasses.dataclass(frozen=True, eq=False)
class TaskSpec:
  """One AGD task as `config.agd.tasks.<name>` states it, validated (the loop runs it as a `loop.Task`).
  `data` is a moma.data config whose mixture holds only this task's entries.

  seq_len: decoder objectives: the packed length; contrastive: the caption length.
  image_size: encoder objectives: image side in pixels (0: the dataset's own), a multiple of it.
  loss_weight scales the task's loss; weight is its sampling weight ("sample" schedule); interval is
  the number of consecutive steps it gets in each round ("round_robin" schedule).
  """

  name: str
  objective: str
  data: ml_collections.ConfigDict
  batch_size: int
  seq_len: int
  image_size: int = 0
  loss_weight: float = 1.0
  weight: float = 1.0
  interval: int = 1


def task_config(objective: str, mixture, *, batch_size: int, seq_len: int = 0, image_size: int = 0,
                loss_weight: float = 1.0, weight: float = 1.0,
                interval: int = 1) -> ml_collections.ConfigDict:
  """A `config.agd.tasks.<name>` entry; `mixture` names entries of `config.data.mixture`."""
  return ml_collections.ConfigDict(dict(
      objective=objective, mixture=tuple(mixture), batch_size=batch_size, seq_len=seq_len,
      image_size=image_size, loss_weight=float(loss_weight), weight=float(weight), interval=interval))


def tasks_from_config(config: ml_collections.ConfigDict) -> list[TaskSpec]:
  """The tasks of `config.agd`, validated; ValueError naming the field for anything they cannot run."""
  if "agd" not in config or not config.agd.get("tasks"):
    raise ValueError("config.agd.tasks is empty: add tasks with moma.agd.task_config (configs/agd.py).")
  if config.agd.schedule not in SCHEDULES:
    raise ValueError(f"config.agd.schedule={config.agd.schedule!r}: choose one of {SCHEDULES}.")
  modalities = tuple(config.model.modalities)
  tasks = []
  for name, cfg in config.agd.tasks.items():
    field = f"agd.tasks.{name}"
    objective = objectives.get(cfg.objective, f"{field}.objective")
    for key in ("weight", "loss_weight", "batch_size", "interval"):
      if not cfg[key] > 0:
        raise ValueError(f"{field}.{key}={cfg[key]} must be positive.")
    if cfg.batch_size % jax.process_count():
      raise ValueError(f"{field}.batch_size={cfg.batch_size} (global) must divide evenly over "
                       f"{jax.process_count()} processes.")
    if cfg.objective != "classification" and cfg.seq_len < 1:
      raise ValueError(f"{field}.seq_len={cfg.seq_len} must be positive for {cfg.objective!r}.")
    if not objective.encoder and cfg.image_size:
      raise ValueError(f"{field}.image_size={cfg.image_size}: decoder objectives read images at the "
                       "data's own size; leave it 0.")
    needs = ("text", "image") if objective.encoder else (objective.scored or "text",)
    for modality in needs:
      if modality not in modalities:
        raise ValueError(f"{field}: objective {cfg.objective!r} needs modality {modality!r}, missing "
                         f"from config.model.modalities={modalities}.")
    task_data = ml_collections.ConfigDict(config.data.to_dict())
    task_data.mixture = ml_collections.ConfigDict()
    for entry_name in cfg.mixture:
      if entry_name not in config.data.mixture:
        raise ValueError(f"{field}.mixture names {entry_name!r}, not an entry of data.mixture "
                         f"({sorted(config.data.mixture)}).")
      entry = config.data.mixture[entry_name]
      if objective.templates is not None and entry.template not in objective.templates:
        raise ValueError(
            f"{field}: objective {cfg.objective!r} needs documents with {_needs(cfg.objective)}, "
            f"which data.mixture.{entry_name} (template {entry.template!r}) lacks; use entries with "
            f"template in {objective.templates}.")
      task_data.mixture[entry_name] = entry
    if not task_data.mixture:
      raise ValueError(f"{field}.mixture is empty: name entries of data.mixture.")
    tasks.append(TaskSpec(name, cfg.objective, task_data, cfg.batch_size, cfg.seq_len, cfg.image_size,
                      cfg.loss_weight, cfg.weight, cfg.interval))
  return tasks


def _needs(objective: str) -> str:
  return {"captioning": "text after an image", "image_generation": "an image after a caption",
          "audio_text": "text after audio", "contrastive": "images paired with captions",
          "classification": "labelled images"}[objective]


class Schedule:
  """Which task trains at each (0-based) step; a pure function of (seed, step).

  "sample": task t with probability weight_t / sum(weights), from a counter-based hash of (seed, step).
  "round_robin": tasks in order, task t for `interval_t` consecutive steps per round (IMP's style).
  """

  def __init__(self, kind: str, weights, intervals, seed: int):
    if kind not in SCHEDULES:
      raise ValueError(f"config.agd.schedule={kind!r}: choose one of {SCHEDULES}.")
    self.kind, self.seed = kind, seed
    weights = np.asarray(weights, np.float64)
    self.cum_weights = np.cumsum(weights / weights.sum())
    self.cycle = np.repeat(np.arange(len(intervals)), intervals)

  @classmethod
  def from_tasks(cls, kind: str, tasks: list[TaskSpec], seed: int) -> "Schedule":
    return cls(kind, [t.weight for t in tasks], [t.interval for t in tasks], seed)

  def tasks_at(self, steps) -> np.ndarray:
    steps = np.asarray(steps, np.int64)
    if self.kind == "round_robin":
      return self.cycle[steps % len(self.cycle)]
    picks = np.searchsorted(self.cum_weights, _uniform(self.seed, steps), side="right")
    return np.minimum(picks, len(self.cum_weights) - 1)

  def task_at(self, step: int) -> int:
    return int(self.tasks_at([step])[0])

  def counts(self, num_steps: int) -> np.ndarray:
    """Steps each task took among steps [0, num_steps)."""
    return np.bincount(self.tasks_at(np.arange(num_steps)), minlength=len(self.cum_weights))


def _uniform(seed: int, steps: np.ndarray) -> np.ndarray:
  """Uniform [0, 1) per step from SplitMix64 of (seed, step): vectorised, stateless."""

  def mix(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))

  golden = np.uint64(0x9E3779B97F4A7C15)
  with np.errstate(over="ignore"):
    base = mix(np.array([seed], np.uint64) * golden)
    z = mix(base + (steps.astype(np.uint64) + np.uint64(1)) * golden)
  return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def objective_model(config: ml_collections.ConfigDict, objective: str) -> encoder.Model:
  """The shared model, running `objective`'s forward pass."""
  return encoder.Model(steps.build_model(config), objective, num_classes=config.agd.num_classes)


def task_step(config: ml_collections.ConfigDict, task: TaskSpec) -> Callable:
  """The trainer's `train_step` for `task` (jit it once per task): (state, batch) → (state, metrics)."""
  loss_fn = functools.partial(objectives.loss_fn(task.objective), loss_weight=task.loss_weight)
  return functools.partial(steps.train_step, model=objective_model(config, task.objective), loss_fn=loss_fn,
                           modalities=tuple(config.model.modalities), seed=config.train.seed,
                           skip_nonfinite=config.train.nan_policy == "skip")


def validate_shapes(task: TaskSpec, source, max_seq_len: int) -> None:
  """A task whose sequences the model cannot take fails before any compilation."""
  for key, length in source.lengths.items():
    if length > max_seq_len:
      raise ValueError(f"agd.tasks.{task.name}.{key} gives sequences of {length} tokens, longer than "
                       f"config.model.max_seq_len={max_seq_len}; shorten the task or raise max_seq_len.")


def _task_tokens(source) -> int:
  return source.task.batch_size * sum(source.lengths.values())


def _flops_per_token(config, source) -> float:
  """Token-weighted training FLOPs per token of one task step (encoder: image and caption passes)."""
  total = sum(n * flops.per_token(config.model, n)["total"] for n in source.lengths.values())
  return total / sum(source.lengths.values())


def summarise(window: list[tuple[str, dict]], counts: dict[str, int]) -> dict[str, float]:
  """Per-task means under `task/<name>/...` (loss = the unweighted objective loss) and the overall keys:
  `loss` (the optimised, weighted loss) and the trainer's other keys, averaged over the window's steps
  (`loss/<m>` weighted by the tokens of modality m)."""
  by_task = collections.defaultdict(list)
  for name, out in jax.device_get(window):
    by_task[name].append(out)
  row, overall = {}, collections.defaultdict(lambda: [0.0, 0.0])
  for name, rows in by_task.items():
    mean = steps.mean_rows(rows)
    for key, value in mean.items():
      if key == "objective_loss":
        row[f"task/{name}/loss"] = value
      elif key in ("accuracy", "logit_scale") or key.startswith("loss/"):
        row[f"task/{name}/{key}"] = value
      if key != "objective_loss" and key not in ("accuracy", "logit_scale"):
        weight = len(rows) * (mean.get(key.replace("loss/", "tokens/", 1), 0.0)
                              if key.startswith("loss/") else 1.0)
        overall[key][0] += weight * value
        overall[key][1] += weight
  row.update({k: total / w for k, (total, w) in overall.items() if w > 0})
  row.update({f"task/{name}/steps": float(n) for name, n in counts.items()})
  return row


def evaluate(config, tasks, sources, eval_fns, params, shard=lambda b: b) -> dict[str, float]:
  """Validation metrics of every task: `eval/task/<name>/...` over `train.eval_steps` batches."""
  row = {}
  for task in tasks:
    rows = [eval_fns[task.name](params, shard(sources[task.name].batch(config.train.seed, i)))
            for i in range(config.train.eval_steps)]
    for key, value in summarise([(task.name, r) for r in rows], {}).items():
      if key.startswith(f"task/{task.name}/"):
        row[f"eval/{key}"] = value
  return row


def _data_sources(config, tasks, split):
  sources = {t.name: agd_data.task_data(t, config.model.modalities, split=split,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count()) for t in tasks}
  for task in tasks:
    validate_shapes(task, sources[task.name], config.model.max_seq_len)
    if task.objective == "classification" and sources[task.name].num_classes > config.agd.num_classes:
      raise ValueError(f"config.agd.num_classes={config.agd.num_classes} is smaller than the "
                       f"{sources[task.name].num_classes} labels of agd.tasks.{task.name}.")
  return sources


def plan(config: ml_collections.ConfigDict) -> loop.RunPlan:
  """The tasks of `config.agd` (config resolved by `train.resolve_config`) as a `loop.RunPlan`; opens and
  checks every task's data, the mesh and the shared model (abstract init), and writes nothing."""
  tasks = tasks_from_config(config)
  tcfg = config.train
  with faults.damaged_data_cache(config.data.cache_dir):
    sources = _data_sources(config, tasks, "train")
  schedule = Schedule.from_tasks(config.agd.schedule, tasks, tcfg.seed)
  first = tasks[schedule.task_at(0)]
  mesh, rules = steps.make_mesh(config)
  shard = functools.partial(loop.shard_batch, mesh=mesh, rules=rules)
  with faults.damaged_data_cache(config.data.cache_dir):
    init_batch = shard(sources[first.name].batch(tcfg.seed, 0))  # Shapes only; any task's model builds all.
  model = objective_model(config, first.objective)
  abstract = steps.abstract_state(config, model, init_batch, mesh, rules)
  eval_fns = {t.name: jax.jit(functools.partial(
      steps.eval_step, model=objective_model(config, t.objective), modalities=tuple(config.model.modalities),
      loss_fn=functools.partial(objectives.loss_fn(t.objective), loss_weight=t.loss_weight)))
              for t in tasks}
  # Opened on the first evaluation only: a run without eval never touches the validation split.
  eval_sources = functools.cache(lambda: _data_sources(config, tasks, "validation"))
  loop_tasks = [loop.Task(t.name, task_step(config, t), functools.partial(sources[t.name].batch, tcfg.seed),
                          _task_tokens(sources[t.name]), _flops_per_token(config, sources[t.name]),
                          t.batch_size, f"agd.tasks.{t.name}.batch_size")
                for t in tasks]
  names = [t.name for t in tasks]
  share = np.array([t.weight * lt.tokens for t, lt in zip(tasks, loop_tasks)])
  mean_flops = float(np.dot(share, [lt.flops_per_token for lt in loop_tasks]) / share.sum())
  return loop.RunPlan(
      tasks=loop_tasks, task_at=schedule.task_at,
      summarise=lambda window, step: summarise(window, dict(zip(names, schedule.counts(step).tolist()))),
      evaluate=lambda params: evaluate(config, tasks, eval_sources(), eval_fns, params, shard),
      init=lambda mngr: steps.init_or_restore(config, model, mngr, init_batch, mesh, rules, abstract),
      mesh=mesh, rules=rules, lr=steps.lr_schedule(tcfg),
      describe=console.describe(config, abstract.params, mean_flops))


@dataclasses.dataclass(frozen=True)
class MixedModel:
  """The mixed-batch baseline: every task's forward pass on its own batch in one step.

  Duck-types `model.apply` for `steps.train_step`, so both arms of an AGD-vs-mixed comparison run the
  trainer's step on the same parameter tree; pair it with `mixed_loss_fn(tasks)` (`mixed_plan` does).
  """

  models: dict

  def apply(self, variables, batches, **kwargs):
    outputs, sown = {}, {"losses": {}, "metrics": {}}
    for name, model in self.models.items():
      outputs[name], task_sown = model.apply(variables, batches[name], **kwargs)
      for collection in sown:
        sown[collection][name] = task_sown.get(collection, {})
    return outputs, sown


def mixed_loss_fn(tasks: list[TaskSpec]) -> Callable:
  """Sum of the tasks' weighted losses; metrics as `<task>/<key>`."""

  def loss_fn(outputs, batches, modalities):
    total, metrics = 0.0, {}
    for task in tasks:
      loss, task_metrics = objectives.loss_fn(task.objective)(
          outputs[task.name], batches[task.name], modalities, loss_weight=task.loss_weight)
      total += loss
      metrics.update({f"{task.name}/{k}": v for k, v in task_metrics.items()})
    return total, metrics

  return loss_fn


def mixed_plan(config: ml_collections.ConfigDict) -> loop.RunPlan:
  """The mixed-batch baseline of `plan(config)` for `loop.run`: one task whose every step holds each AGD
  task's batch (`MixedModel`, `mixed_loss_fn`), with the same data, initial state, optimizer and
  evaluation. Its rows name each task's loss `task/<name>/loss`, as AGD's do."""
  agd_plan = plan(config)
  tasks = tasks_from_config(config)
  step_fn = functools.partial(
      steps.train_step, model=MixedModel({t.name: objective_model(config, t.objective) for t in tasks}),
      loss_fn=mixed_loss_fn(tasks), modalities=tuple(config.model.modalities), seed=config.train.seed,
      skip_nonfinite=config.train.nan_policy == "skip")
  parts = agd_plan.tasks
  tokens = sum(t.tokens for t in parts)
  mixed = loop.Task("mixed", step_fn, lambda step: {t.name: t.batch_at(step) for t in parts}, tokens,
                    sum(t.tokens * t.flops_per_token for t in parts) / tokens,
                    sum(t.batch_size for t in parts), "agd.tasks.*.batch_size")

  def summarise(window, step):
    del step
    row = steps.mean_rows([out for _, out in window])
    return {(f"task/{k.removesuffix('/objective_loss')}/loss" if k.endswith("/objective_loss") else k): v
            for k, v in row.items()}

  return dataclasses.replace(agd_plan, tasks=[mixed], task_at=lambda step: 0, summarise=summarise)
