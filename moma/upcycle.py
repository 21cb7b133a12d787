"""Growing a trained model into a sparser one: upcycling into experts, untying into per-modality copies.

`upcycle(src, dst, layout=..., modalities=...)` walks the freshly initialised target tree `dst` and fills it
from the trained tree `src` (what `config.init.params_from` / `upcycle_from` read; docs/training.md,
"Growing a pretrained model"):

* An MoE layer (a dict holding `router` and the expert kernels `wi/kernel` [E, d, 2, F], `wo/kernel`
  [E, F, d], see `moma.layers.moe.MoE`) whose source is an FFN of another shape takes its expert weights from
  the SwiGLU FFN at the same path in `src` (`wi/kernel` [(G,) d, 2, F], `wo/kernel` [(G,) F, d]: the MoT
  FFN's and the 1t1i experts' layout): every expert of modality m's group gets a copy of modality m's FFN
  (a per-modality weight) or of the shared FFN (no group axis); the routers (and aux routers) stay freshly
  initialised. A source MoE layer of the target's shape is copied whole, routers included.
* Every other leaf is copied from `src` when the same path exists there and kept from `dst` otherwise. A
  target leaf with a `modality` axis (MoT / Mixture-of-Mamba: an untied weight) whose source lacks that axis
  (dense / Mamba) gets the source weight in every modality's copy. A target leaf with a `vocab` axis longer
  than the source's (a text model grown into image / audio codebooks) keeps the source rows bit for bit and
  its fresh init in the rows past them.

The axes are read from the target's boxes (logical names), so `dst` must be boxed for the last two rules.
Leading layer-stack axes (nn.scan) pass through. Boxed leaves keep their boxes. The trainer resets the
optimiser and schedule.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moma.layers import routing

# Expert kernel → the number of dimensions of one expert's weight (wi: [d, 2, F], wo: [F, d]).
EXPERT_WEIGHTS = {"wi": 3, "wo": 2}
FRESH = ("router", "aux_router")


def upcycle(src: Mapping[str, Any], dst: Mapping[str, Any], *, layout: str | None,
            modalities: Sequence[str]) -> dict:
  """New `dst` tree filled from `src` (module docstring); `layout`: the target's moe.layout (None: no MoE)."""
  lay = routing.parse_layout(layout, modalities) if layout else None
  return _walk(nn.meta.unbox(src), dst, lay, len(tuple(modalities)), path=())


def upcycle_weight(src_w: Any, dst_shape: Sequence[int], layout: routing.Layout, num_modalities: int,
                   path: str = "", weight_ndim: int = 2) -> jnp.ndarray:
  """One FFN weight → expert weight of `dst_shape` ([..., E, *w], `weight_ndim` dims in w): each group gets
  its modality's copy."""
  src_w, dst_shape = jnp.asarray(src_w), tuple(dst_shape)
  axis = len(dst_shape) - weight_ndim - 1  # the expert axis
  lead, trail = dst_shape[:axis], dst_shape[axis + 1:]
  if tuple(src_w.shape[-weight_ndim:]) != trail:
    raise ValueError(f"upcycle: source {path} has shape {src_w.shape}, the target needs [..., {trail}]: the "
                     "source checkpoint has a different d_model or d_ff")
  if src_w.ndim == len(dst_shape) - 1 and tuple(src_w.shape[:axis]) == lead:  # shared FFN
    return jnp.broadcast_to(jnp.expand_dims(src_w, axis), dst_shape).astype(src_w.dtype)
  if src_w.ndim != len(dst_shape) or tuple(src_w.shape[:axis]) != lead:
    raise ValueError(f"upcycle: source {path} has shape {src_w.shape}, not a shared or per-modality FFN "
                     f"weight for target {dst_shape} (different num_layers?)")
  if layout.shared or src_w.shape[axis] != num_modalities:
    raise ValueError(f"upcycle: source {path} has {src_w.shape[axis]} groups; a per-modality source needs "
                     f"{num_modalities} (one per modality) and a modality layout, not {layout.sizes}")
  return jnp.repeat(src_w, np.asarray(layout.sizes), axis=axis, total_repeat_length=dst_shape[axis])


def _walk(src, dst, lay, num_modalities, path):
  if not isinstance(dst, Mapping):
    return _copy_leaf(src, dst, path)
  if "router" in dst and all(n in dst for n in EXPERT_WEIGHTS):
    return _moe_layer(src, dst, lay, num_modalities, path)
  return {k: _walk(src.get(k) if isinstance(src, Mapping) else None, v, lay, num_modalities, path + (k,))
          for k, v in dst.items()}


def _same_shapes(src, dst) -> bool:
  shape = lambda tree, n: np.shape(nn.meta.unbox((tree.get(n) or {}).get("kernel")))
  return isinstance(src, Mapping) and all(shape(src, n) == shape(dst, n) for n in EXPERT_WEIGHTS)


def _moe_layer(src, dst, lay, num_modalities, path):
  where = "/".join(path) or "<root>"
  if _same_shapes(src, dst):  # the same expert layout: copied as it is, routers included
    return {k: _walk(src.get(k), v, lay, num_modalities, path + (k,)) for k, v in dst.items()}
  out = dict(dst)
  for n, weight_ndim in EXPERT_WEIGHTS.items():
    w = src.get(n) if isinstance(src, Mapping) else None
    w = w.get("kernel") if isinstance(w, Mapping) else None
    if w is None:
      raise ValueError(f"upcycle: source has no FFN weight '{n}/kernel' at {where}; upcycle from a dense, MoT "
                       "or 1t1i checkpoint of the same architecture")
    target = nn.meta.unbox(dst[n]["kernel"])
    new = upcycle_weight(w, target.shape, lay, num_modalities, f"{where}/{n}/kernel", weight_ndim)
    out[n] = {"kernel": _rebox(dst[n]["kernel"], new.astype(target.dtype))}
  for k in dst:
    if k not in EXPERT_WEIGHTS and k not in FRESH:
      out[k] = _walk(src.get(k) if isinstance(src, Mapping) else None, dst[k], lay, num_modalities,
                     path + (k,))
  return out


def _copy_leaf(src, dst, path):
  if src is None or isinstance(src, Mapping):
    return dst
  target = nn.meta.unbox(dst)
  names = tuple(getattr(dst, "names", ()))
  value, shape = jnp.asarray(src, target.dtype), tuple(target.shape)
  if "modality" in names and value.ndim == len(shape) - 1:  # untied: every modality's copy is the weight
    axis = names.index("modality")
    if _drop(shape, axis) == value.shape:
      value = jnp.broadcast_to(jnp.expand_dims(value, axis), shape)
  if "vocab" in names and value.ndim == len(shape):  # a grown vocabulary: the new rows keep their fresh init
    axis = names.index("vocab")
    if value.shape[axis] < shape[axis] and _drop(value.shape, axis) == _drop(shape, axis):
      value = jax.lax.dynamic_update_slice_in_dim(target, value, 0, axis)
  if tuple(value.shape) != shape:
    raise ValueError(f"upcycle: {'/'.join(path)} has shape {np.shape(src)} in the source and {target.shape} "
                     "in the target: the source checkpoint has a different d_model / vocab / depth")
  return _rebox(dst, value)


def _drop(shape, axis):
  return tuple(shape[:axis]) + tuple(shape[axis + 1:])


def _rebox(box, value):
  return box.replace_boxed(value) if isinstance(box, nn.meta.AxisMetadata) else value
