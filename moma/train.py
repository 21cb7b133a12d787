"""The one trainer: `train_and_evaluate(config, workdir)`, used by the CLI, tests and notebooks.

It validates everything (config fields, data, mesh, the model by an abstract init) before it writes
anything, then hands a `loop.RunPlan` to `moma.loop.run`: the plain LM run is a one-task plan (`lm_plan`),
an AGD run (a config with an `agd` section) the several-task plan of `moma.agd.plan`. The pieces both
are built from live in moma/steps.py. The run directory is described in docs/design.md and README.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable

import jax
import ml_collections

from moma import agd
from moma import checkpoint
from moma import cli
from moma import console
from moma import data
from moma import faults
from moma import flops
from moma import loop
from moma import sharding
from moma import steps
from moma import validation
from moma.models import model_config


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy with derived fields filled in (vocab_size from the data), every train / checkpoint field and
  the stage / init validated."""
  config = ml_collections.ConfigDict(config.to_dict())
  validation.check_fields(config)
  with faults.damaged_data_cache(config.data.cache_dir):
    # Recorded in config.json, so a resume with another tokenizer file is refused (check_compatible).
    config.data.text_tokenizer_fingerprint = data.text_tokenizer_fingerprint(config.data)
    if config.model.vocab_size == 0:
      config.model.vocab_size = data.vocab_size(config.data)
    data.check_model_vocab(config.data, config.model.vocab_size)
  if tuple(config.data.modalities) != tuple(config.model.modalities):
    raise ValueError(f"config.data.modalities={tuple(config.data.modalities)} must equal "
                     f"config.model.modalities={tuple(config.model.modalities)} (batch ids index both); set "
                     "both, or pick them with the config argument modalities=, e.g. "
                     "configs/mot.py:modalities=text+image")
  if config.data.get("image_form") == "patches" and not config.model.get("patch_dim"):
    # P = patch_size² × the mixture's image channels (grey images join an RGB mixture as 3 channels).
    config.model.patch_dim = data.Packer(config.data, split="train", seq_len=config.train.seq_len).patch_dim
  if config.train.stage not in steps.STAGES:
    raise ValueError(f"config.train.stage={config.train.stage!r} is unknown; choose one of "
                     f"{list(steps.STAGES)}")
  if config.init.upcycle_from and config.init.get("params_from"):
    raise ValueError("config.init.upcycle_from and config.init.params_from are both set; choose one")
  for field in ("upcycle_from", "params_from"):
    if config.init.get(field):
      checkpoint.check_source(config.init[field], f"config.init.{field}")
  steps.take_source_shape(config)  # A grown model has its source's shape; the user names the architecture.
  if config.train.stage == "aux_routers":
    model = config.model
    has_aux = (model.get("ffn") == "moe" and (model.get("moe") or {}).get("aux_router")) or (
        (model.get("mod") or {}).get("enabled") and model.mod.get("aux_router"))
    if not has_aux:
      raise ValueError("config.train.stage='aux_routers' needs config.model.moe.aux_router=True (ffn='moe') "
                       "or config.model.mod.aux_router=True (mod.enabled)")
  if config.train.batch_size % jax.process_count():
    raise ValueError(f"config.train.batch_size={config.train.batch_size} must divide evenly over "
                     f"{jax.process_count()} processes")
  # Batch-level routing groups (model_config.routing_group): per-device routing (0) is recorded as the rows
  # it stands for on this mesh, so a resume on a mesh that would change them is refused (check_compatible).
  # One row (the default) divides every device's rows; AGD tasks keep what they are given (their own batches).
  used = {"moe": (config.model.get("ffn") == "moe", model_config.MoeConfig),
          "mod": ((config.model.get("mod") or {}).get("enabled"), model_config.ModConfig)}
  shards = functools.cache(lambda: sharding.batch_shards(*steps.make_mesh(config)))
  for field, (on, kind) in used.items():
    rows = (config.model.get(field) or {}).get("routing_rows", kind.routing_rows)
    if on and rows != 1 and "agd" not in config:
      per_device = config.train.batch_size // shards()
      config.model[field].routing_rows = model_config.routing_group(field, rows, per_device)
  return config


def host_batches(config, split: str) -> Callable[[int], dict]:
  """step → this process's host batch of `split` (a pure function of (seed, step): resumes need no
  iterator state)."""
  packer = data.Packer(config.data, split=split, seq_len=config.train.seq_len,
                       process_index=jax.process_index(), process_count=jax.process_count())
  per_process = config.train.batch_size // jax.process_count()
  return lambda step: packer.batch(config.train.seed, step, per_process)


def lm_plan(config: ml_collections.ConfigDict) -> loop.RunPlan:
  """The plain language-model run as a one-task plan; builds and checks data, mesh and model (abstract
  init) and writes nothing."""
  tcfg = config.train
  module, model = steps.model_module(config), steps.build_model(config)
  mesh, rules = steps.make_mesh(config)
  with faults.damaged_data_cache(config.data.cache_dir):
    # One batch remembered: the first serves the shapes, the ahead-of-time compile and step 0, packed once.
    train_at = functools.lru_cache(maxsize=1)(host_batches(config, "train"))
    first_host = train_at(0)

  def batch_at(step):  # Validated on the host (prefetch thread), before it reaches the device.
    batch = train_at(step)
    module.validate_batch(batch, model_config=config.model)
    return batch

  module.validate_batch(first_host, model_config=config.model)
  first = loop.shard_batch(first_host, mesh, rules)  # Shapes for init and compilation.
  abstract = steps.abstract_state(config, model, first, mesh, rules)
  statics = dict(model=model, loss_fn=module.loss_fn, modalities=tuple(config.model.modalities))
  step_fn = functools.partial(steps.train_step, seed=tcfg.seed, stage=tcfg.stage,
                              skip_nonfinite=tcfg.nan_policy == "skip", **statics)
  flops_per_token = flops.per_token(config.model, tcfg.seq_len)["total"]
  task = loop.Task("lm", step_fn, batch_at, tcfg.batch_size * tcfg.seq_len, flops_per_token, tcfg.batch_size)
  eval_fn = jax.jit(functools.partial(steps.eval_step, **statics))
  eval_at = functools.cache(lambda: host_batches(config, "validation"))  # Opened at the first eval.

  def evaluate(params):
    rows = [eval_fn(params, loop.shard_batch(eval_at()(i), mesh, rules)) for i in range(tcfg.eval_steps)]
    return {f"eval/{k}": v for k, v in steps.mean_rows(rows).items() if not k.startswith("routing/")}

  def summarise(window, step):
    del step
    return steps.mean_rows([out for _, out in window])

  return loop.RunPlan(
      tasks=[task], task_at=lambda step: 0, summarise=summarise, evaluate=evaluate,
      init=lambda mngr: steps.init_or_restore(config, model, mngr, first, mesh, rules, abstract),
      mesh=mesh, rules=rules, lr=steps.lr_schedule(tcfg),
      describe=console.describe(config, abstract.params, flops_per_token))


def check_workdir(workdir: str) -> None:
  """Raises ValueError naming `--workdir` unless it can hold a run: non-empty (an unset shell variable
  must not train into the current directory), a directory or nothing yet, under a directory, with
  `checkpoints` a directory or nothing yet."""
  if not workdir or not workdir.strip():
    raise ValueError("--workdir is empty; name the run directory (new, or of a run to resume), e.g. "
                     "--workdir=runs/mot_tiny")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file; name a directory (new or of a run to resume)")
  parent = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"--workdir={workdir} is under {parent}, which is a file; name a directory path")
  ckpts = os.path.join(workdir, "checkpoints")
  if os.path.exists(ckpts) and not os.path.isdir(ckpts):
    raise ValueError(f"--workdir={workdir}: {ckpts} is a file, where the run keeps its checkpoints; move it "
                     "away or use another --workdir")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop: faults.Preemption | None = None) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its latest readable checkpoint); returns the last
  metrics. Everything is validated before the first write: a failed start leaves `workdir` as it was.
  `stop` holds a stop signal received since the program began (`moma.main` installs it first of all);
  without it, signals are caught from here on."""
  with contextlib.nullcontext(stop) if stop else faults.Preemption() as stop:
    stop.install()  # Again: jax.distributed.initialize (multi-host) replaces the SIGTERM handler.
    stop.check()
    check_workdir(workdir)
    config = resolve_config(config)
    checkpoint.check_compatible(config, workdir)
    stop.check()
    plan = agd.plan(config) if "agd" in config else lm_plan(config)
    return loop.run(config, workdir, plan, stop)


def run(config, workdir: str, *, tracebacks: bool = False, stop: faults.Preemption | None = None) -> int:
  """Trains `config` in `workdir`; returns the exit code. User errors (bad config, data, workdir) and
  faults (lock held, divergence, a signal) are one line on stderr (`cli.report`), with the traceback if
  `tracebacks`."""
  return cli.report(lambda: train_and_evaluate(config, workdir, stop), tracebacks=tracebacks)
