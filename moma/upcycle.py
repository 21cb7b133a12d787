"""Sparse upcycling: start a MoMa / MoE model from a 1t1i, MoT (untied FFN) or dense parameter tree.

`upcycle(src, dst, layout=..., modalities=...)` walks the freshly initialised target tree `dst`. An MoE layer
(a dict holding `router` and the expert weights `wi_gate`, `wi_up`, `wo`, see `moma.layers.moe.MoE`) takes
its expert weights from the FFN at the same path in `src`: every expert of modality m's group gets a copy
of modality m's FFN (a per-modality weight [..., G, a, b]) or of the shared FFN (a plain [..., a, b]); the
routers (and aux routers) stay freshly initialised. Every other leaf is copied from `src` when the same path
exists there and kept from `dst` otherwise. Leading layer-stack axes (nn.scan) pass through. Boxed
(logically partitioned) leaves keep their boxes. The trainer resets the optimiser and schedule.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from moma.layers import routing

EXPERT_WEIGHTS = ("wi_gate", "wi_up", "wo")
FRESH = ("router", "aux_router")


def upcycle(src: Mapping[str, Any], dst: Mapping[str, Any], *, layout: str, modalities: Sequence[str],
            names: Mapping[str, str] | None = None) -> dict:
  """New `dst` tree with the experts copied from `src`'s FFNs. `names` maps expert → source weight names."""
  lay = routing.parse_layout(layout, modalities)
  names = {n: n for n in EXPERT_WEIGHTS} | dict(names or {})
  return _walk(nn.meta.unbox(src), dst, lay, len(tuple(modalities)), names, path=())


def upcycle_weight(src_w: Any, dst_shape: Sequence[int], layout: routing.Layout, num_modalities: int,
                   path: str = "") -> jnp.ndarray:
  """One FFN weight → expert weight of `dst_shape` ([..., E, a, b]): each group gets its modality's copy."""
  src_w, dst_shape = jnp.asarray(src_w), tuple(dst_shape)
  lead, trail = dst_shape[:-3], dst_shape[-2:]
  if tuple(src_w.shape[-2:]) != trail:
    raise ValueError(f"upcycle: source {path} has shape {src_w.shape}, the target needs [..., {trail}]: the "
                     "source checkpoint has a different d_model or d_ff")
  if src_w.ndim == len(dst_shape) - 1 and tuple(src_w.shape[:-2]) == lead:  # shared FFN
    return jnp.broadcast_to(jnp.expand_dims(src_w, -3), dst_shape).astype(src_w.dtype)
  if src_w.ndim != len(dst_shape) or tuple(src_w.shape[:-3]) != lead:
    raise ValueError(f"upcycle: source {path} has shape {src_w.shape}, not a shared or per-modality FFN "
                     f"weight for target {dst_shape} (different num_layers?)")
  if layout.shared or src_w.shape[-3] != num_modalities:
    raise ValueError(f"upcycle: source {path} has {src_w.shape[-3]} groups; a per-modality source needs "
                     f"{num_modalities} (one per modality) and a modality layout, not {layout.sizes}")
  return jnp.repeat(src_w, np.asarray(layout.sizes), axis=-3, total_repeat_length=dst_shape[-3])


def _walk(src, dst, lay, num_modalities, names, path):
  if not isinstance(dst, Mapping):
    return _copy_leaf(src, dst, path)
  if "router" in dst and all(n in dst for n in EXPERT_WEIGHTS):
    return _moe_layer(src, dst, lay, num_modalities, names, path)
  return {k: _walk(src.get(k) if isinstance(src, Mapping) else None, v, lay, num_modalities, names,
                   path + (k,)) for k, v in dst.items()}


def _moe_layer(src, dst, lay, num_modalities, names, path):
  where = "/".join(path) or "<root>"
  out = dict(dst)
  for n in EXPERT_WEIGHTS:
    w = src.get(names[n]) if isinstance(src, Mapping) else None
    w = w.get("kernel") if isinstance(w, Mapping) else w
    if w is None:
      raise ValueError(f"upcycle: source has no FFN weight {names[n]!r} (or {names[n]}/kernel) at {where}; "
                       "upcycle from a dense, MoT or 1t1i checkpoint of the same architecture")
    target = nn.meta.unbox(dst[n])
    new = upcycle_weight(w, target.shape, lay, num_modalities, f"{where}/{names[n]}").astype(target.dtype)
    out[n] = _rebox(dst[n], new)
  for k in dst:
    if k not in EXPERT_WEIGHTS and k not in FRESH:
      out[k] = _walk(src.get(k) if isinstance(src, Mapping) else None, dst[k], lay, num_modalities, names,
                     path + (k,))
  return out


def _copy_leaf(src, dst, path):
  if src is None or isinstance(src, Mapping):
    return dst
  target = nn.meta.unbox(dst)
  if tuple(np.shape(src)) != tuple(target.shape):
    raise ValueError(f"upcycle: {'/'.join(path)} has shape {np.shape(src)} in the source and {target.shape} "
                     "in the target: the source checkpoint has a different d_model / vocab / depth")
  return _rebox(dst, jnp.asarray(src, target.dtype))


def _rebox(box, value):
  return box.replace_boxed(value) if isinstance(box, nn.meta.AxisMetadata) else value
