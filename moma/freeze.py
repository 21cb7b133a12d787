"""`config.train.freeze`: parameters that never train, and get no optimizer state (LMFusion's recipe).

`config.train.freeze` is a tuple of entries, each one of:

* a modality name (`"text"`, `"image"`, `"audio"`): that modality's copy of every untied weight (the
  `modality` axis of MoT / Mixture-of-Mamba leaves) and its expert group's experts (the `expert` axis of
  MoMa's `wi` / `wo`). Routers always train; shared weights (embeddings, output, norms that are not untied)
  are not a modality's and train unless a pattern names them.
* a pattern (`fnmatch`, `*` crosses `/`) on the parameter's path with `/` between keys, e.g.
  `layers/mixer/*`, `embed/embedding`, `*norm*`: every matching leaf, whole.

A modality's copy is a slice of a leaf, so `plan` records per leaf the whole leaf or (axis, start, stop), and
`on_pieces` wraps the optimizer so that it sees such leaves cut into pieces along that axis (`split`): the
frozen pieces take the "freeze" label (`optax.set_to_zero`, no moments), the others Adam's. The updates
are joined back (`merge`), so the train state keeps the model's tree; frozen pieces get an exact zero
update and stay bit-identical. An entry that matches nothing is a ValueError naming config.train.freeze.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moma.layers import routing

# keystr(path) → () for the whole leaf, or (axis, start, stop, size): the frozen slice along `axis`.
Plan = Mapping[str, tuple[int, ...]]


def is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def entries(freeze) -> tuple[str, ...]:
  """config.train.freeze as a tuple (a string is one entry, or several joined by ',')."""
  return tuple(p for p in freeze.split(",") if p) if isinstance(freeze, str) else tuple(freeze)


def plan(freeze, model_config: Mapping[str, Any], params) -> dict[str, tuple[int, ...]]:
  """The frozen part of every leaf of the boxed `params` that `freeze` names (module docstring)."""
  wanted = entries(freeze)
  modalities = tuple(model_config["modalities"])
  moe = model_config.get("moe") or {}
  layout = (routing.parse_layout(moe.get("layout", "4t4i"), modalities)
            if model_config.get("ffn") == "moe" else None)
  out, used = {}, set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    key, shape = jax.tree_util.keystr(path), nn.meta.unbox(leaf).shape
    whole = [p for p in wanted if p not in modalities and fnmatch.fnmatchcase(name, p)]
    if whole:
      out[key] = ()
      used.update(whole)
      continue
    for m in (p for p in wanted if p in modalities):
      part = _modality_slice(tuple(getattr(leaf, "names", ())), modalities.index(m), layout, name)
      if part and key in out:
        raise ValueError(f"config.train.freeze={wanted}: {name} is untied; freeze one modality's copies "
                         "(or name the whole leaf by a pattern)")
      if part:
        out[key] = (*part, shape[part[0]])
        used.add(m)
  unused = [p for p in wanted if p not in used]
  if unused:
    raise ValueError(f"config.train.freeze={wanted}: {unused[0]!r} matches no parameter of this model; use "
                     f"a modality with untied weights or experts {modalities}, or a path pattern like "
                     "'layers/mixer/*' (paths join keys with '/')")
  return out


def _modality_slice(names: Sequence[str], m: int, layout, name: str) -> tuple[int, int, int] | None:
  """(axis, start, stop) of modality m's copy or expert group in a leaf with logical axes `names`."""
  if "router" in name:
    return None
  if "modality" in names:
    return names.index("modality"), m, m + 1
  if "expert" in names and layout is not None and not layout.shared:
    start = sum(layout.sizes[:m])
    return names.index("expert"), start, start + layout.sizes[m]
  return None


def _bounds(part) -> list[int]:
  axis, start, stop, size = part
  del axis
  return sorted({0, start, stop, size})


def piece_of(path) -> tuple[str, int | None]:
  """(keystr of the leaf, index of the piece or None) of a path into a `split` tree."""
  if path and isinstance(path[-1], jax.tree_util.SequenceKey):
    return jax.tree_util.keystr(path[:-1]), path[-1].idx
  return jax.tree_util.keystr(path), None


def is_frozen(frozen: Plan, key: str, piece: int | None) -> bool:
  """Whether piece `piece` (None: the whole leaf) of leaf `key` is frozen."""
  part = frozen.get(key)
  if part is None:
    return False
  return part == () or piece == _bounds(part).index(part[1])


def split(tree, frozen: Plan):
  """`tree` (boxed or plain) with every partly frozen leaf replaced by the tuple of its pieces."""
  def cut(path, leaf):
    part = frozen.get(jax.tree_util.keystr(path))
    if not part:
      return leaf
    value, bounds = nn.meta.unbox(leaf), _bounds(part)
    pieces = [jax.lax.slice_in_dim(value, a, b, axis=part[0]) for a, b in zip(bounds, bounds[1:])]
    return tuple(leaf.replace_boxed(p) if is_box(leaf) else p for p in pieces)
  return jax.tree_util.tree_map_with_path(cut, tree, is_leaf=is_box)


def merge(pieces, like, frozen: Plan):
  """The inverse of `split`: `pieces` joined back into the structure of `like` (plain arrays)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_box)
  parts = treedef.flatten_up_to(pieces)
  joined = [jnp.concatenate(part, axis=frozen[jax.tree_util.keystr(path)][0]) if isinstance(part, tuple)
            else part for (path, _), part in zip(leaves, parts)]
  return treedef.unflatten(joined)


def on_pieces(tx: optax.GradientTransformation, frozen: Plan) -> optax.GradientTransformation:
  """`tx` applied to the `split` params and updates; its updates are merged back."""
  def init(params):
    return tx.init(split(params, frozen))

  def update(updates, state, params=None):
    new, state = tx.update(split(updates, frozen), state, None if params is None else split(params, frozen))
    return merge(new, updates, frozen), state

  return optax.GradientTransformation(init, update)
