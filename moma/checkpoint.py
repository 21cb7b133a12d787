"""Run directory bookkeeping: config.json, the compatibility check on resume, and orbax checkpoints.

Checkpoints live under DIR/checkpoints as orbax steps (async, written atomically by orbax: a step
directory only appears once complete). The data order is a pure function of the step, so the train state
(step, params, optimizer state) is all a resume needs. Rotation keeps the newest `checkpoint.max_to_keep`
steps and, whatever their age, the good one with the best validation loss and the newest good one (orbax
preservation policies over the metrics each save records: a run that dies slowly keeps a model from
before it began to die).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from moma import data
from moma import faults
from moma.models import model_config

# Fields that must match between the config that made a workdir and the one resuming it (prefixes):
# model shape/architecture, data (mixture, tokenisation, vocabulary), batch shape and seed (data order),
# training stage, frozen parameters (they shape the optimizer state) and initialisation, and an AGD run's
# tasks and schedule. Everything else (train.steps, log_every, lr, checkpoint.*, mesh.*) changes how long
# or how visibly the run goes, not what is trained, and may change on resume.
MUST_MATCH = ("model.", "data.", "train.batch_size", "train.seq_len", "train.seed", "train.stage",
              "train.freeze", "init.", "agd.")
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
  # A model or data field that a config.json (or a config) lacks stands at its default: it is what the run
  # was built with, so a field added since does not lock older runs out. (Not mixture entries: an entry a
  # run lacks is one it did not train on.)
  saved = _load_json(path)
  modalities = tuple(saved.get("data", {}).get("modalities", config.data.modalities))
  data_defaults = {k: v for k, v in flatten({"data": data.default_config(modalities).to_dict()}).items()
                   if not k.startswith("data.mixture.")}
  defaults = {**flatten({"model": model_config.defaults(model_config.ModelConfig)}), **data_defaults,
              "train.freeze": []}
  old = {**defaults, **flatten(saved)}
  new = {**defaults, **flatten(config)}
  diffs = []
  for key in sorted(set(old) | set(new)):
    if not key.startswith(MUST_MATCH) or key.startswith(MAY_DIFFER):
      continue
    if old.get(key, "<absent>") != new.get(key, "<absent>"):
      diffs.append(f"config.{key}: workdir has {old.get(key, '<absent>')!r}, config has "
                   f"{new.get(key, '<absent>')!r}")
  if diffs:
    raise ValueError(f"workdir {workdir} holds a run of an incompatible config ({'; '.join(diffs)}); use "
                     "a new --workdir, or revert these fields to resume that run")


def _load_json(path: str) -> dict:
  try:
    with open(path) as f:
      loaded = json.load(f)
    if not isinstance(loaded, dict):
      raise ValueError("not an object")
    return loaded
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is damaged ({e}); restore it from a copy of the run, or delete it to let "
                     "this config take over the workdir's checkpoints") from None


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """DIR/config.json, replaced atomically (a kill mid-write leaves the old file or the new one)."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
      json.dump(_jsonable(config.to_dict()), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _eval_loss(metrics) -> float:
  return metrics.get("eval_loss", math.inf)


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """orbax CheckpointManager over DIR/checkpoints (made by the first save, not before: a refused start
  writes nothing). Keeps the newest `checkpoint.max_to_keep` steps, the best-validation good step and
  the newest good step (`save`'s metrics)."""
  keep = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(config.checkpoint.max_to_keep),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m["good_step"], n=1,
                                keep_checkpoints_without_metrics=False),
      checkpoint_managers.BestN(get_metric_fn=_eval_loss, reverse=True, n=1,
                                keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=1,  # The trainer decides when to save (every_steps and the last step).
      preservation_policy=keep,
      best_fn=_eval_loss, best_mode="min",  # Also makes orbax record each step's metrics on disk.
      enable_async_checkpointing=config.checkpoint.async_save,
      create=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               item_names=("default", "window"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, window: dict, *, good: bool,
         eval_loss: float | None = None) -> None:
  """Saves `state` (item "default") and the trainer's unlogged window (item "window", JSON) as one step.
  `good`: saved while the loss was calm (no spike in progress); `eval_loss`: validated at this step.
  Only a good step's validation loss competes for best."""
  metrics = {"good_step": step if good else -1}
  if good and eval_loss is not None:
    metrics["eval_loss"] = eval_loss
  with _disk_full_named(mngr):
    mngr.save(step, args=ocp.args.Composite(default=ocp.args.StandardSave(state),
                                            window=ocp.args.JsonSave(window)), metrics=metrics)


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for a pending async save (its write errors surface here or at the next save)."""
  with _disk_full_named(mngr):
    mngr.wait_until_finished()


@contextlib.contextmanager
def _disk_full_named(mngr: ocp.CheckpointManager):
  """A write that failed for lack of space (orbax and tensorstore word it inside their own errors) becomes
  one line naming the checkpoint directory and the fix."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except (re-raised unless it is a full disk)
    if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in str(e):
      raise
    raise faults.RunError(f"no space left on the device of {mngr.directory} while saving a checkpoint; free "
                          "space there (the checkpoints saved before are kept) and run the same command "
                          "again to resume") from e


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """(state, step, window) from the latest readable checkpoint, or (None, 0, None) when there is none.

  When the latest steps fail to restore (e.g. truncated by a full disk) but an older one restores, the
  unreadable ones move to DIR/unreadable_checkpoints with a warning (so that the run can save those steps
  again). When none restores, the latest one's error is raised and nothing moves. `window` is what `save`
  stored with the state (None for checkpoints written before it existed).
  """
  unreadable = []  # (step, error), newest first
  for step in sorted(mngr.all_steps(), reverse=True):
    has_window = os.path.isdir(os.path.join(str(mngr.directory), str(step), "window"))
    args = dict(default=ocp.args.StandardRestore(abstract_state))
    if has_window:
      args["window"] = ocp.args.JsonRestore()
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except (orbax raises many kinds; an older step decides)
      unreadable.append((step, e))
      continue
    for bad, e in unreadable:  # Warned only now: when none restores, the error below says it all.
      logging.warning("checkpoint step %d is unreadable (%s); step %d restored instead", bad, _first_line(e),
                      step)
    set_aside(mngr, [bad for bad, _ in unreadable], "unreadable_checkpoints")
    return restored["default"], step, restored["window"] if has_window else None
  if unreadable:
    step, e = unreadable[0]
    raise ValueError(f"no checkpoint under {mngr.directory} is readable (latest: step {step}: "
                     f"{_first_line(e)}); if it holds another model's run, use another --workdir, else move "
                     "the checkpoints directory away to start afresh") from e
  return None, 0, None


def _first_line(e: Exception) -> str:
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def set_aside(mngr: ocp.CheckpointManager, steps: list[int], folder: str) -> str:
  """Moves checkpoint `steps` to DIR/`folder`/STEP (replacing an older copy of the same step), out of the
  manager's sight; returns that folder. No save may be in flight (`wait` first)."""
  aside = os.path.join(os.path.dirname(str(mngr.directory)), folder)
  if not steps:
    return aside
  if jax.process_index() == 0:
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, str(step))
      if os.path.isdir(target):
        shutil.rmtree(target)
      os.replace(os.path.join(str(mngr.directory), str(step)), target)
  logging.warning("moved checkpoint steps %s to %s", steps, aside)
  mngr.reload()
  return aside


def read_config(workdir: str, field: str) -> dict:
  """DIR/config.json as a dict; `field` (the config field that named DIR) is in the error if it is absent."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{field}={workdir!r}: no config.json there; name the workdir of a finished run")
  return _load_json(path)


def check_source(workdir: str, field: str) -> None:
  """Raises ValueError naming `field` unless DIR holds a readable config.json and a checkpoint (read-only)."""
  read_config(workdir, field)
  directory = os.path.join(workdir, "checkpoints")
  if not (os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))):
    raise ValueError(f"{field}={workdir!r} has no checkpoint under {directory}; train that run first")


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
    # The whole state is read (this orbax has no placeholder restore), only the params are returned. Onto
    # one device, whatever mesh saved it: a run trained on 8 devices samples on a laptop.
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), dict(tree))
    return ckptr.restore(path, target)["params"]


def _jsonable(v):
  if isinstance(v, dict):
    return {k: _jsonable(x) for k, x in v.items()}
  if isinstance(v, (tuple, list)):
    return [_jsonable(x) for x in v]
  return v
