"""What a run directory holds, read strictly: the fault tests' checks of metrics, TensorBoard and checkpoints."""

import json
import os

import jax
import orbax.checkpoint as ocp

from moma import metrics


def strict_rows(workdir):
  """metrics.jsonl parsed as strict JSON (bare NaN / Infinity are errors)."""
  def refuse(token):
    raise AssertionError(f"non-JSON constant {token} in metrics.jsonl")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def tensorboard_matches_metrics(workdir):
  """TensorBoard holds each logged step once: per tag, exactly the steps metrics.jsonl logs it at."""
  rows = strict_rows(workdir)
  tags = metrics.tensorboard_steps(workdir)
  assert tags and set(tags) == {k for r in rows for k, v in r.items() if k != "step" and v is not None}
  for tag, steps in tags.items():
    assert steps == [r["step"] for r in rows if r.get(tag) is not None], tag


def params_at(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(tree))
    return ckptr.restore(path, target)["params"]
