"""Alternating Gradient Descent (IMP, arXiv 2305.06324): one task per step, one compiled step per task.

A config with an `agd` section trains several tasks on one shared parameter tree and optimizer state:

  config.agd.schedule = "sample"       # or "round_robin"
  config.agd.num_classes = 10          # classification head width
  config.agd.tasks.<name> = agd.task_config(objective, mixture, batch_size, seq_len, ...)

Each step the schedule names a task (a pure function of (seed, step), so a resumed run continues the
same sequence); its batch (a pure function of (seed, task, step)) goes through that task's own compiled
train step, with its own shapes: no padding to a common shape, no recompiling after the first step.
Tasks reuse the trainer's pieces (`train.create_state`, `train.train_step`, orbax checkpoints, the metric
writer); `moma.models.encoder.Model` puts the decoder and the encoder heads in one tree.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from moma import agd_data
from moma import checkpoint
from moma import metrics as metrics_lib
from moma import objectives
from moma import train
from moma.models import encoder

SCHEDULES = ("sample", "round_robin")


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One AGD task. `data` is a moma.data config whose mixture holds only this task's entries.

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


def tasks_from_config(config: ml_collections.ConfigDict) -> list[Task]:
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
    tasks.append(Task(name, cfg.objective, task_data, cfg.batch_size, cfg.seq_len, cfg.image_size,
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
  def from_tasks(cls, kind: str, tasks: list[Task], seed: int) -> "Schedule":
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


def build_model(config: ml_collections.ConfigDict, objective: str) -> encoder.Model:
  """The shared model, running `objective`'s forward pass."""
  return encoder.Model(train.build_model(config), objective, num_classes=config.agd.num_classes)


def task_step(config: ml_collections.ConfigDict, task: Task) -> Callable:
  """The trainer's `train_step` for `task` (jit it once per task): (state, batch) → (state, metrics)."""
  loss_fn = functools.partial(objectives.loss_fn(task.objective), loss_weight=task.loss_weight)
  return functools.partial(train.train_step, model=build_model(config, task.objective), loss_fn=loss_fn,
                           modalities=tuple(config.model.modalities), seed=config.train.seed)


class StepCache:
  """One compiled step per task, compiled ahead of time on the task's first batch and reused after.

  `traces[name]` counts how often a task's step was traced: once, however many steps the task takes
  (a batch of another shape raises instead of silently recompiling).
  """

  def __init__(self, make_step: Callable[[Task], Callable]):
    self._make_step = make_step
    self._compiled: dict[str, Any] = {}
    self.traces: collections.Counter = collections.Counter()

  def __call__(self, task: Task, state, batch):
    compiled = self._compiled.get(task.name)
    if compiled is None:
      step = self._make_step(task)

      def traced(state, batch):
        self.traces[task.name] += 1
        return step(state, batch)

      t0 = time.perf_counter()
      compiled = jax.jit(traced, donate_argnums=0).lower(state, batch).compile()
      logging.info("Compiled the step of task %s in %.1fs", task.name, time.perf_counter() - t0)
      self._compiled[task.name] = compiled
    return compiled(state, batch)


def validate_shapes(task: Task, source, max_seq_len: int) -> None:
  """A task whose sequences the model cannot take fails before any compilation."""
  for key, length in source.lengths.items():
    if length > max_seq_len:
      raise ValueError(f"agd.tasks.{task.name}.{key} gives sequences of {length} tokens, longer than "
                       f"config.model.max_seq_len={max_seq_len}; shorten the task or raise max_seq_len.")
