"""The one trainer: `train_and_evaluate(config, workdir)`, used by the CLI, tests and notebooks.

Pieces that other trainers (AGD tasks, the aux-router stage, sharded runs) reuse are plain functions:
`build_model`, `make_optimizer`, `create_state`, `train_step(state, batch, ...)` (jit it per task or per
shape), `eval_step`. The run directory is described in ../shared/DESIGN.md and README.md.
"""

from __future__ import annotations

import functools
import importlib
import os
import time
from typing import Any, Iterator

from absl import logging
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from moma import checkpoint
from moma import data
from moma import flops
from moma import metrics as metrics_lib
from moma import sharding
from moma import upcycle

TrainState = train_state.TrainState
# Leaf names that never get weight decay: norm scales, biases, embeddings, Mamba's A_log and D.
NO_DECAY_SUFFIXES = ("scale", "bias", "embedding", "A_log")
NO_DECAY_NAMES = ("D",)
# config.train.stage → which parameters train (by their path); the others get zero updates.
# "aux_routers" (MoMa stage 2): the main model is frozen, only the auxiliary routers learn.
STAGES = {"main": lambda path: True, "aux_routers": lambda path: "aux_router" in path}
# config.train.stage → which sown "losses" (by their path) the stage minimises; None: LM loss + all of them.
STAGE_LOSSES = {"main": None, "aux_routers": lambda path: "aux_router" in path}


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy with derived fields filled in (vocab_size from the data) and stage / init validated."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.vocab_size == 0:
    config.model.vocab_size = data.vocab_size(config.data)
  if tuple(config.data.modalities) != tuple(config.model.modalities):
    raise ValueError(f"config.data.modalities={tuple(config.data.modalities)} must equal "
                     f"config.model.modalities={tuple(config.model.modalities)} (batch ids index both)")
  if config.data.get("image_form") == "patches" and not config.model.get("patch_dim"):
    config.model.patch_dim = config.data.patch_size ** 2  # one channel; validate_batch checks the data's P
  if config.train.stage not in STAGES:
    raise ValueError(f"config.train.stage={config.train.stage!r} is unknown; choose one of {list(STAGES)}")
  if config.init.upcycle_from and config.init.get("params_from"):
    raise ValueError("config.init.upcycle_from and config.init.params_from are both set; choose one")
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
  return config


def model_module(config: ml_collections.ConfigDict):
  """The module `moma.models.<config.model.name>` (defines Model, loss_fn, validate_batch)."""
  try:
    return importlib.import_module(f"moma.models.{config.model.name}")
  except ModuleNotFoundError as e:
    raise ValueError(f"config.model.name={config.model.name!r}: no module moma.models."
                     f"{config.model.name}") from e


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  return model_module(config).Model(**config.model)


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to cfg.lr, then cosine or linear decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
  end = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps,
                                              max(cfg.steps, cfg.warmup_steps + 1), end)
  if cfg.schedule == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
         optax.linear_schedule(cfg.lr, end, max(cfg.steps - cfg.warmup_steps, 1))],
        [cfg.warmup_steps])
  raise ValueError(f"config.train.schedule={cfg.schedule!r} is unknown; choose cosine or linear")


def _leaf_name(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


def weight_decay_mask(params) -> Any:
  """True for the weights that decay (matmul kernels); False for norms, biases, embeddings, A_log, D."""
  def decays(path, _):
    name = _leaf_name(path)
    return not (name.endswith(NO_DECAY_SUFFIXES) or name in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """Clipping + AdamW (decay masked) for the parameters that train in `cfg.stage`; zero for the rest."""
  adamw = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=weight_decay_mask))
  trains = STAGES[cfg.stage]
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if trains(jax.tree_util.keystr(path)) else "freeze", params)
  return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)


def create_state(config: ml_collections.ConfigDict, model: nn.Module, batch) -> TrainState:
  """Fresh train state (params from `config.train.seed`); `batch` only provides shapes."""
  rng = jax.random.key(config.train.seed)
  variables = model.init(rng, batch, deterministic=True)
  params = nn.unbox(variables["params"])
  return TrainState.create(apply_fn=model.apply, params=params,
                           tx=make_optimizer(config.train, params))


def make_mesh(config: ml_collections.ConfigDict):
  """(mesh, rules) of `config.mesh`. A shape without -1 that asks for fewer devices than this single
  process has (e.g. the default (1,) on an 8-GPU node) uses the first ones, with a warning."""
  devices = jax.devices()
  wanted = int(np.prod(config.mesh.shape))
  if -1 not in tuple(config.mesh.shape) and wanted < len(devices) and jax.process_count() == 1:
    logging.warning("config.mesh.shape=%s uses %d of %d devices; put -1 on an axis to use them all",
                    tuple(config.mesh.shape), wanted, len(devices))
    devices = devices[:wanted]
  return sharding.mesh_from_config(config.mesh, devices), sharding.rules_from_config(config.mesh)


def shard_batch(batch, mesh, rules) -> Any:
  """`sharding.shard_batch` over a (possibly nested, e.g. AGD's encoder) dict of this process's rows."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
  names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat]
  arrays = sharding.shard_batch(dict(zip(names, (x for _, x in flat))), mesh, rules)
  return jax.tree.unflatten(treedef, [arrays[n] for n in names])


def init_or_restore(config, model, mngr, batch, mesh, rules) -> tuple[TrainState, Any, int]:
  """(state, its shardings, step): the latest checkpoint in `mngr` (if any) resharded onto `mesh`, else
  a fresh state at step 0, created sharded (each device computes only its shards). `batch` gives shapes.

  A fresh state takes its parameters from `config.init.upcycle_from` (sparse upcycling into the expert
  layout) or `config.init.params_from` (same architecture, e.g. the aux-router stage) when set; the
  optimizer state and the schedule start from zero either way.
  """
  logical = jax.eval_shape(functools.partial(model.init, deterministic=True), jax.random.key(0),
                           batch)["params"]
  make = functools.partial(create_state, config, model)
  abstract = sharding.abstract_sharded(make, mesh, rules, batch, logical=logical)
  state, step = checkpoint.restore_latest(mngr, abstract) if mngr else (None, 0)
  if state is not None:
    logging.info("Resumed from %s at step %d", mngr.directory, step)
    return state, jax.tree.map(lambda a: a.sharding, abstract), step
  state, state_sh = sharding.init_sharded(make, mesh, rules, batch, logical=logical)
  source = config.init.upcycle_from or config.init.get("params_from", "")
  if source:  # The source's weights are read whole on each host, then placed on the mesh.
    params = initial_params(config, state.params, source)
    fresh = TrainState.create(apply_fn=model.apply, params=params, tx=state.tx)
    leaves = jax.device_put(jax.tree.leaves(fresh), jax.tree.leaves(state_sh))
    state = jax.tree.unflatten(jax.tree.structure(state), leaves)
  return state, state_sh, 0


def compile_step(step_fn, state, batch, state_sh):
  """`step_fn(state, batch) -> (state, metrics)` compiled for these shapes; the state keeps `state_sh`
  and is donated. Call inside `sharding.activate` so the model's activation constraints apply."""
  jitted = jax.jit(step_fn, out_shardings=(state_sh, None), donate_argnums=0)
  return jitted.lower(state, batch).compile()


def initial_params(config, params, source: str):
  """`params` (fresh) with the weights of `source`'s latest checkpoint: upcycled or copied by path."""
  field = "upcycle_from" if config.init.upcycle_from else "params_from"
  src_model = checkpoint.read_config(source, f"config.init.{field}")["model"]
  for key in ("d_model", "num_layers", "vocab_size"):
    if src_model.get(key) != config.model[key]:
      raise ValueError(f"config.init.{field}={source!r} has model.{key}={src_model.get(key)}, this config "
                       f"{config.model[key]}: the source must have the same {key}")
  src = checkpoint.restore_params(source, f"config.init.{field}")
  if field == "params_from":
    return copy_params(src, params, source)
  if src_model.get("ffn") == "moe" and src_model["moe"]["layout"] != "1t1i":
    raise ValueError(f"config.init.upcycle_from={source!r} has moe.layout={src_model['moe']['layout']!r}; "
                     "upcycle from a dense, MoT or 1t1i run")
  logging.info("Upcycling %s into layout %s", source, config.model.moe.layout)
  return upcycle.upcycle(model_module(config).upcycle_source(src), params,
                         layout=config.model.moe.layout, modalities=config.model.modalities)


def copy_params(src, dst, source: str):
  """`dst` with every leaf that `src` has at the same path (shapes must agree); the rest stay fresh."""
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(src)}

  def take(path, fresh):
    old = flat.get(jax.tree_util.keystr(path))
    if old is None:
      return fresh
    if np.shape(old) != np.shape(fresh):
      raise ValueError(f"config.init.params_from={source!r}: {jax.tree_util.keystr(path)} has shape "
                       f"{np.shape(old)} there and {np.shape(fresh)} here; use a run of the same architecture")
    return jnp.asarray(old, fresh.dtype)

  return jax.tree_util.tree_map_with_path(take, dst)


def routing_metrics(sown) -> dict[str, jax.Array]:
  """The "metrics" collection → {"routing/<name>": mean over layers and occurrences}."""
  by_name: dict[str, list[jax.Array]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(sown)[0]:
    name = next(str(k.key) for k in reversed(path) if hasattr(k, "key"))
    by_name.setdefault(f"routing/{name}", []).append(jnp.mean(leaf))
  return {k: jnp.mean(jnp.stack(v)) for k, v in by_name.items()}


def loss_and_metrics(params, batch, rng, *, model, loss_fn, modalities, deterministic, stage="main"):
  """Next-token loss + the sum of the sown "losses" (aux losses); metrics incl. routing stats.

  In a stage with its own losses (`STAGE_LOSSES`), the objective is the sum of those sown losses only.
  """
  logits, sown = model.apply({"params": params}, batch, deterministic=deterministic,
                             rngs=None if rng is None else {"dropout": rng,
                                                            "diffusion": jax.random.fold_in(rng, 1)},
                             mutable=["losses", "metrics"])
  loss, per_modality = loss_fn(logits, batch, modalities)
  picks = STAGE_LOSSES[stage] or (lambda path: True)
  aux_loss = sum((jnp.sum(x) for p, x in jax.tree_util.tree_leaves_with_path(sown.get("losses", {}))
                  if picks(jax.tree_util.keystr(p))), jnp.float32(0))
  out = {"loss": loss, "aux_loss": aux_loss, **per_modality, **routing_metrics(sown.get("metrics", {}))}
  return (aux_loss if STAGE_LOSSES[stage] else loss + aux_loss), out


def train_step(state: TrainState, batch, *, model, loss_fn, modalities, seed, stage="main"):
  """One optimizer step; a pure function of (state, batch) so it can be jitted per task/shape.

  Train-time randomness (e.g. router noise) comes from the "dropout" rng stream, a function of
  (seed, step) so that a resumed run draws the same numbers.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
  (_, out), grads = grad_fn(state.params, batch, rng, model=model, loss_fn=loss_fn,
                            modalities=modalities, deterministic=False, stage=stage)
  out["grad_norm"] = optax.tree_utils.tree_norm(grads)
  return state.apply_gradients(grads=grads), out


def eval_step(params, batch, *, model, loss_fn, modalities):
  return loss_and_metrics(params, batch, None, model=model, loss_fn=loss_fn, modalities=modalities,
                          deterministic=True)[1]


def eval_and_checkpoint(config, step, state, mngr, writer, final, mesh_rules, evaluate_fn) -> None:
  """The tail of a training step (this trainer's and AGD's): eval every `train.eval_every` steps and at the
  last one (`evaluate_fn(params)` → metrics row, traced under the mesh so activation constraints apply),
  checkpoint every `checkpoint.every_steps` steps and at the last one."""
  tcfg = config.train
  if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.steps):
    with sharding.activate(*mesh_rules):
      row = evaluate_fn(state.params)
    writer.write(step, row)
    final.update(row)
  if step % config.checkpoint.every_steps == 0 or step == tcfg.steps:
    checkpoint.save(mngr, step, state)


def _batches(config, split: str, start_step: int) -> Iterator[dict]:
  return data.batches(config.data, split=split, batch_size=config.train.batch_size // jax.process_count(),
                      seq_len=config.train.seq_len, seed=config.train.seed, start_step=start_step,
                      process_index=jax.process_index(), process_count=jax.process_count())


def _mean(rows: list[dict]) -> dict[str, float]:
  """Per-key mean over steps; `loss/<m>` weighted by `tokens/<m>` and left out when m never occurred."""
  host = jax.device_get(rows)
  cols = {k: np.array([float(r[k]) for r in host]) for k in host[0]}
  out = {}
  for key, vals in cols.items():
    weights = cols.get(key.replace("loss/", "tokens/", 1)) if key.startswith("loss/") else None
    if weights is None:
      out[key] = float(vals.mean())
    elif weights.sum() > 0:
      out[key] = float((vals * weights).sum() / weights.sum())
  return out


def evaluate(config, params, eval_fn, prepare) -> dict[str, float]:
  it = _batches(config, "validation", 0)
  rows = [eval_fn(params, prepare(next(it))) for _ in range(config.train.eval_steps)]
  return {f"eval/{k}": v for k, v in _mean(rows).items() if not k.startswith("routing/")}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the last metrics."""
  if "agd" in config:  # Alternating tasks, one compiled step per task: moma/agd.py.
    from moma import agd  # pylint: disable=g-import-not-at-top (agd imports this module)
    return agd.train_and_evaluate(config, workdir)
  config = resolve_config(config)
  os.makedirs(workdir, exist_ok=True)
  checkpoint.check_compatible(config, workdir)
  checkpoint.write_config(config, workdir)

  module = model_module(config)
  model = build_model(config)
  mesh, rules = make_mesh(config)

  def prepare(host_batch):  # Validated on the host, then this process's rows → global arrays.
    module.validate_batch(host_batch, model_config=config.model)
    return shard_batch(host_batch, mesh, rules)

  statics = dict(model=model, loss_fn=module.loss_fn, modalities=tuple(config.model.modalities))
  tcfg = config.train

  mngr = checkpoint.manager(workdir, config)
  first = prepare(next(_batches(config, "train", 0)))  # Shapes only, for init and compilation.
  state, state_sh, start = init_or_restore(config, model, mngr, first, mesh, rules)
  if start >= tcfg.steps:
    mngr.close()
    logging.info("%s is already trained to step %d (train.steps=%d)", workdir, start, tcfg.steps)
    return {k: v for r in metrics_lib.read(workdir) if r["step"] == start for k, v in r.items()}

  # Compiled ahead of time so that compilation stays out of the throughput numbers.
  t0 = time.perf_counter()
  with sharding.activate(mesh, rules):
    step_fn = compile_step(functools.partial(train_step, seed=tcfg.seed, stage=tcfg.stage, **statics),
                           state, first, state_sh)
  logging.info("Compiled the train step in %.1fs", time.perf_counter() - t0)
  eval_fn = jax.jit(functools.partial(eval_step, **statics))
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  flops_per_token = flops.per_token(config.model, tcfg.seq_len)["total"]
  peak = metrics_lib.peak_flops_per_device()
  tokens_per_step = tcfg.batch_size * tcfg.seq_len
  schedule = lr_schedule(tcfg)

  final: dict[str, float] = {"step": start}
  window: list[dict] = []
  it = _batches(config, "train", start)
  bar = tqdm.tqdm(total=tcfg.steps, initial=start, disable=not tcfg.progress_bar or jax.process_index(),
                  unit="step", dynamic_ncols=True)
  try:
    t0 = time.perf_counter()  # Wall clock of the steps in `window`.
    for step in range(start + 1, tcfg.steps + 1):
      state, out = step_fn(state, prepare(next(it)))
      window.append(out)
      bar.update(1)
      if step % tcfg.log_every == 0 or step == tcfg.steps:
        row = _mean(window)  # Waits for the device: the clock below covers the whole window.
        row["tokens_per_s"] = tokens_per_step * len(window) / (time.perf_counter() - t0)
        row["flops_per_token"] = flops_per_token
        if peak:
          row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * mesh.size)
        row["lr"] = float(schedule(step - 1))
        writer.write(step, row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        logging.info("step %d: %s", step, {k: round(v, 4) for k, v in row.items()})
        final.update(row, step=step)
        window = []
      eval_and_checkpoint(config, step, state, mngr, writer, final, (mesh, rules),
                          lambda params: evaluate(config, params, eval_fn, prepare))
      if not window:
        t0 = time.perf_counter()
  finally:  # Also on interruption: let a pending async save finish, flush the metrics.
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return final
