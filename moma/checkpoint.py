"""Run directory bookkeeping: config.json, the compatibility check on resume, and orbax checkpoints.

Checkpoints live under DIR/checkpoints as orbax steps (async, keep-N, written atomically by orbax: a
step directory only appears once complete). The data order is a pure function of the step, so the
train state (step, params, optimizer state) is all a resume needs.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

# Fields that must match between the config that made a workdir and the one resuming it (prefixes):
# model shape/architecture, data (mixture, tokenisation, vocabulary), batch shape and seed (data order),
# training stage and initialisation. Everything else (train.steps, log_every, lr, checkpoint.*, mesh.*)
# changes how long or how visibly the run goes, not what is trained, and may change on resume.
MUST_MATCH = ("model.", "data.", "train.batch_size", "train.seq_len", "train.seed", "train.stage",
              "init.")
# Exceptions inside MUST_MATCH: where the embedded data is cached does not change the data.
MAY_DIFFER = ("data.cache_dir",)


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict:
  """{"model.d_model": 64, ...}; tuples become lists so that values compare equal to JSON's."""
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = _jsonable(v)
  return out


def check_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError naming every differing field if DIR/config.json was made by another model/data."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = flatten(json.load(f))
  new = flatten(config)
  diffs = []
  for key in sorted(set(old) | set(new)):
    if not key.startswith(MUST_MATCH) or key.startswith(MAY_DIFFER):
      continue
    if old.get(key, "<absent>") != new.get(key, "<absent>"):
      diffs.append(f"  {key}: workdir has {old.get(key, '<absent>')!r}, config has "
                   f"{new.get(key, '<absent>')!r}")
  if diffs:
    raise ValueError(
        f"workdir {workdir} holds a run of an incompatible config; differing fields:\n"
        + "\n".join(diffs) + "\nUse a new --workdir, or revert these fields to resume that run.")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(_jsonable(config.to_dict()), f, indent=2, sort_keys=True)


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """orbax CheckpointManager over DIR/checkpoints keeping `checkpoint.max_to_keep` steps."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoint.max_to_keep,
      save_interval_steps=1,  # The trainer decides when to save (every_steps and the last step).
      enable_async_checkpointing=config.checkpoint.async_save,
      create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state))


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """(state, step) from the latest checkpoint, or (None, 0) when the workdir has none."""
  step = mngr.latest_step()
  if step is None:
    return None, 0
  state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  return state, step


def read_config(workdir: str, field: str) -> dict:
  """DIR/config.json as a dict; `field` (the config field that named DIR) is in the error if it is absent."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{field}={workdir!r}: no config.json there; name the workdir of a finished run")
  with open(path) as f:
    return json.load(f)


def restore_params(workdir: str, field: str):
  """The params of DIR's latest checkpoint as host arrays (no target tree: the architecture may differ)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  step = ocp.CheckpointManager(directory).latest_step() if os.path.isdir(directory) else None
  if step is None:
    raise ValueError(f"{field}={workdir!r} has no checkpoint under {directory}; train that run first")
  path = os.path.join(directory, str(step), "default")
  with ocp.StandardCheckpointer() as ckptr:
    metadata = ckptr.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    # The whole state is read (this orbax has no placeholder restore), only the params are returned.
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(tree))
    return ckptr.restore(path, target)["params"]


def _jsonable(v):
  if isinstance(v, dict):
    return {k: _jsonable(x) for k, x in v.items()}
  if isinstance(v, (tuple, list)):
    return [_jsonable(x) for x in v]
  return v
