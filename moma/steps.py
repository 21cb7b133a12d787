"""The pieces every training run is built from: model, optimizer, train state, and the step functions.

`build_model`, `make_optimizer`, `create_state`, `train_step(state, batch, ...)` (jit it per task or per
shape), `eval_step`, `init_or_restore` (a checkpoint or a fresh, sharded state). The plain LM run
(moma/train.py) and AGD (moma/agd.py) both build a `loop.RunPlan` from them; neither imports the other's
plan.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from absl import logging
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moma import checkpoint
from moma import freeze
from moma import sharding
from moma import upcycle
from moma.models import model_config

TrainState = train_state.TrainState
# Leaf names that never get weight decay: norm scales, biases, embeddings, Mamba's A_log and D.
NO_DECAY_SUFFIXES = ("scale", "bias", "embedding", "A_log")
NO_DECAY_NAMES = ("D",)
# config.train.stage → which parameters train (by their path); the others get zero updates and no state.
# "aux_routers" (MoMa stage 2): the main model is frozen, only the auxiliary routers learn.
STAGES = {"main": lambda path: True, "aux_routers": lambda path: "aux_router" in path}
# config.train.stage → which sown "losses" (by their path) the stage minimises; None: LM loss + all of them.
STAGE_LOSSES = {"main": None, "aux_routers": lambda path: "aux_router" in path}

def model_module(config: ml_collections.ConfigDict):
  """The module `moma.models.<config.model.name>` (defines as_model, loss_fn, validate_batch)."""
  try:
    return importlib.import_module(f"moma.models.{config.model.name}")
  except ModuleNotFoundError as e:
    raise ValueError(f"config.model.name={config.model.name!r}: no module moma.models."
                     f"{config.model.name}; use --config.model.name=decoder (the early-fusion LM)") from e


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The model of `config.model`, validated once (`model_module(config).as_model`)."""
  return model_module(config).as_model(config.model)


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
  """The parameter's name: the last dict key (a boxed leaf's path ends in the box's `.value`)."""
  return next(str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))


def weight_decay_mask(params) -> Any:
  """True for the weights that decay (matmul kernels); False for norms, biases, embeddings, A_log, D."""
  def decays(path, _):
    name = _leaf_name(path)
    return not (name.endswith(NO_DECAY_SUFFIXES) or name in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: ml_collections.ConfigDict, frozen: freeze.Plan | None = None
                   ) -> optax.GradientTransformation:
  """Clipping + AdamW (decay masked) for the parameters that train in `cfg.stage`; zero for the rest.

  `frozen` (`freeze.plan` of `cfg.freeze`): the leaves, or slices of leaves, that never train. The optimizer
  sees those leaves cut into pieces (`freeze.split`), so a frozen piece is one of the "freeze" label's:
  zero updates and no optimizer state at all. Masks and labels are functions of the parameter tree, so the
  same optimizer takes boxed or plain params."""
  adamw = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=weight_decay_mask))
  trains = STAGES[cfg.stage]
  frozen = frozen or {}

  def label(path, _):
    key, piece = freeze.piece_of(path)
    return "train" if trains(key) and not freeze.is_frozen(frozen, key, piece) else "freeze"

  labels = lambda pieces: jax.tree_util.tree_map_with_path(label, pieces, is_leaf=freeze.is_box)
  tx = optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)
  return freeze.on_pieces(tx, frozen) if frozen else tx


def create_state(config: ml_collections.ConfigDict, model: nn.Module, batch) -> TrainState:
  """Fresh train state (params from `config.train.seed`); `batch` only provides shapes.

  Params and optimizer moments are `nn.LogicallyPartitioned` boxes (optax maps over them), from which
  `sharding.init_sharded` reads every leaf's sharding; `nn.unbox` gives the plain state. `config.train.freeze`
  is resolved against the boxed params (their logical axes name the modality and expert axes).
  """
  rng = jax.random.key(config.train.seed)
  params = model.init(rng, batch, deterministic=True)["params"]
  frozen = freeze.plan(config.train.get("freeze", ()), config.model, params)
  return TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(config.train, frozen))


def make_mesh(config: ml_collections.ConfigDict):
  """(mesh, rules) of `config.mesh`. A shape without -1 that asks for fewer devices than this single
  process has (e.g. the default (1,) on an 8-GPU node) uses the first ones, with a warning."""
  devices = jax.devices()
  wanted = int(np.prod(config.mesh.shape))
  if 0 < wanted < len(devices) and -1 not in tuple(config.mesh.shape) and jax.process_count() == 1:
    logging.warning("config.mesh.shape=%s uses %d of %d devices; put -1 on an axis to use them all",
                    tuple(config.mesh.shape), wanted, len(devices))
    devices = devices[:wanted]
  return sharding.mesh_from_config(config.mesh, devices), sharding.rules_from_config(config.mesh)


def abstract_state(config, model, batch, mesh, rules):
  """The abstract sharded TrainState, by `eval_shape` of the init: checks the model against the config and
  a batch, and the init source's shape (`check_init_source`), without computing anything. Every parameter
  and moment must carry logical axes."""
  check_init_source(config)
  make = functools.partial(create_state, config, model)
  return sharding.abstract_sharded(make, mesh, rules, batch, require_boxed=True)


def init_or_restore(config, model, mngr, batch, mesh, rules, abstract=None):
  """(state, its shardings, step, saved window): the latest readable checkpoint in `mngr` (if any)
  resharded onto `mesh`, else a fresh state at step 0, created sharded (each device computes only its
  shards). `batch` gives shapes; `abstract` is `abstract_state`'s (computed when omitted).

  A fresh state takes its parameters from `config.init.params_from` or `config.init.upcycle_from` (the same
  thing: `initial_params`) when set; the optimizer state and the schedule start from zero either way.
  """
  if abstract is None:
    abstract = abstract_state(config, model, batch, mesh, rules)
  make = functools.partial(create_state, config, model)
  state, step, window = checkpoint.restore_latest(mngr, abstract) if mngr else (None, 0, None)
  if state is not None:
    logging.info("Resumed from %s at step %d", mngr.directory, step)
    return state, jax.tree.map(lambda a: a.sharding, abstract), step, window
  state, state_sh = sharding.init_sharded(make, mesh, rules, batch, abstract=abstract)
  source = config.init.upcycle_from or config.init.get("params_from", "")
  if source:  # The source's weights are read whole on each host, then placed on the mesh.
    with sharding.activate(mesh, rules):
      boxes = jax.eval_shape(make, batch).params  # the logical axes `initial_params` reads
    params = initial_params(config, jax.tree.map(lambda b, p: b.replace_boxed(p), boxes, state.params,
                                                 is_leaf=freeze.is_box), source)
    fresh = TrainState.create(apply_fn=model.apply, params=nn.meta.unbox(params), tx=state.tx)
    leaves = jax.device_put(jax.tree.leaves(fresh), jax.tree.leaves(state_sh))
    state = jax.tree.unflatten(jax.tree.structure(state), leaves)
  return state, state_sh, 0, None


# Model fields a grown model shares with its source (the vocabulary may grow; what is untied or routed,
# and the modalities, may differ).
GROW_SAME = ("block", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff", "norm",
             "norm_placement", "qk_norm", "qk_norm_kind", "tie_embeddings", "patch_dim")
GROW_SAME_MAMBA = ("mamba.d_state", "mamba.d_conv", "mamba.expand", "mamba.dt_rank")


# What a grown model takes from its source's config.json besides `GROW_SAME`'s shape: what its outputs
# depend on. The user names only the architecture (block, ffn, untie, experts) and the data.
GROW_TAKES = ("norm_eps", "rope_theta", "max_seq_len")


def take_source_shape(config) -> None:
  """Sets `config.model`'s shape (`GROW_SAME` but the block, the Mamba sizes of a Mamba target,
  `GROW_TAKES`) to the run named by config.init.params_from / upcycle_from, which a grown model must share;
  the block (transformer or Mamba) stays the config's, checked by `check_init_source`."""
  source, field = _init_source(config)
  if not source:
    return
  src = checkpoint.read_config(source, field)["model"]
  keys = [k for k in GROW_SAME if k not in ("block", "patch_dim")] + list(GROW_TAKES)
  if config.model.get("block") == "mamba":
    keys += GROW_SAME_MAMBA
  for key in keys:
    *sections, leaf = key.split(".")
    src_node, dst_node = src, config.model
    for section in sections:
      src_node, dst_node = src_node.get(section, {}), dst_node[section]
    if leaf in src_node:
      dst_node[leaf] = src_node[leaf]


def _init_source(config) -> tuple[str, str]:
  """(source run, the config field naming it) of `config.init`; ("", "") when none."""
  field = "upcycle_from" if config.init.upcycle_from else "params_from"
  return config.init.get(field, ""), f"config.init.{field}"


def check_init_source(config) -> None:
  """Raises ValueError (one line naming the config.init field and the model field) unless the run named by
  config.init.params_from / upcycle_from has this config's shape (`GROW_SAME`; a vocabulary may grow)."""
  source, field = _init_source(config)
  if not source:
    return
  src = model_config.ModelConfig.from_config(checkpoint.read_config(source, field)["model"])
  dst = model_config.ModelConfig.from_config(config.model)
  get = lambda cfg, key: functools.reduce(getattr, key.split("."), cfg)
  for key in GROW_SAME + (GROW_SAME_MAMBA if dst.block == "mamba" else ()) + ("vocab_size",):
    if get(src, key) != get(dst, key) and (key != "vocab_size" or src.vocab_size > dst.vocab_size):
      grows = " or enlarges it" if key == "vocab_size" else ""
      raise ValueError(f"{field}={source!r} has model.{key}={get(src, key)}, this config {get(dst, key)}: "
                       f"a grown model keeps its source's {key}{grows}")
  if src.ffn == "moe" and src.moe.layout not in ("1t1i", dst.moe.layout):
    raise ValueError(f"{field}={source!r} has moe.layout={src.moe.layout!r}; grow from a dense, MoT, 1t1i "
                     "run or one of this layout")


def initial_params(config, params, source: str):
  """`params` (fresh, boxed) filled from `source`'s latest checkpoint by `upcycle.upcycle`: the same
  architecture copied, a dense / Mamba / 1t1i source grown into this config's untied copies and experts,
  the vocabulary grown (docs/training.md, "Growing a pretrained model")."""
  check_init_source(config)
  _, field = _init_source(config)
  dst = model_config.ModelConfig.from_config(config.model)
  logging.info("Initialising from %s", source)
  try:
    return upcycle.upcycle(checkpoint.restore_params(source, field), params,
                           layout=dst.moe.layout if dst.ffn == "moe" else None, modalities=dst.modalities)
  except ValueError as e:
    raise ValueError(f"{field}={source!r}: {e}") from None


def routing_metrics(sown) -> dict[str, jax.Array]:
  """The "metrics" collection → {"routing/<name>": mean over layers and occurrences}."""
  by_name: dict[str, list[jax.Array]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(sown)[0]:
    name = next(str(k.key) for k in reversed(path) if hasattr(k, "key"))
    by_name.setdefault(f"routing/{name}", []).append(jnp.mean(leaf))
  return {k: jnp.mean(jnp.stack(v)) for k, v in by_name.items()}


def forward(params, batch, rng, *, model, deterministic, collections=("losses", "metrics")):
  """(model outputs, the sown `collections`); `rng` None in evaluation."""
  return model.apply({"params": params}, batch, deterministic=deterministic,
                     rngs=None if rng is None else {"dropout": rng, "diffusion": jax.random.fold_in(rng, 1)},
                     mutable=list(collections))


def loss_and_metrics(params, batch, rng, *, model, loss_fn, modalities, deterministic, stage="main"):
  """Next-token loss + the sum of the sown "losses" (aux losses); metrics incl. routing stats.

  In a stage with its own losses (`STAGE_LOSSES`), the objective is the sum of those sown losses only.
  """
  logits, sown = forward(params, batch, rng, model=model, deterministic=deterministic)
  loss, per_modality = loss_fn(logits, batch, modalities)
  picks = STAGE_LOSSES[stage] or (lambda path: True)
  aux_loss = sum((jnp.sum(x) for p, x in jax.tree_util.tree_leaves_with_path(sown.get("losses", {}))
                  if picks(jax.tree_util.keystr(p))), jnp.float32(0))
  out = {"loss": loss, "aux_loss": aux_loss, **per_modality, **routing_metrics(sown.get("metrics", {}))}
  return (aux_loss if STAGE_LOSSES[stage] else loss + aux_loss), out


def train_step(state: TrainState, batch, *, model, loss_fn, modalities, seed, stage="main",
               skip_nonfinite=False):
  """One optimizer step; a pure function of (state, batch) so it can be jitted per task/shape.

  Train-time randomness (e.g. router noise) comes from the "dropout" rng stream, a function of
  (seed, step) so that a resumed run draws the same numbers. With `skip_nonfinite`, a step whose
  objective or gradient norm is not finite keeps the old params and optimizer state (the step counter,
  hence the data order, still advances) and reports `skipped` = 1.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
  (objective, out), grads = grad_fn(state.params, batch, rng, model=model, loss_fn=loss_fn,
                                    modalities=modalities, deterministic=False, stage=stage)
  out["grad_norm"] = optax.tree_utils.tree_norm(grads)
  new = state.apply_gradients(grads=grads)
  if skip_nonfinite:
    ok = jnp.isfinite(objective) & jnp.isfinite(out["grad_norm"])
    keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(ok, a, b), n, o)
    new = new.replace(params=keep(new.params, state.params), opt_state=keep(new.opt_state, state.opt_state))
    out["skipped"] = 1.0 - ok.astype(jnp.float32)
  return new, out


def eval_step(params, batch, *, model, loss_fn, modalities):
  return loss_and_metrics(params, batch, None, model=model, loss_fn=loss_fn, modalities=modalities,
                          deterministic=True)[1]

def mean_rows(rows: list[dict]) -> dict[str, float]:
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
