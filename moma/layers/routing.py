"""Routing pieces shared by MoMa / MoE (`moe.py`) and Mixture-of-Depths (`mod.py`).

Layouts: "4t4i" means 4 text experts and 4 image experts; letters are the first letters of the names in
`modalities` (every modality needs exactly one group). "8shared" is one group of 8 experts that every token
may use (the plain MoE baseline). Experts are numbered group by group in `modalities` order.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moma import dispatch


@dataclasses.dataclass(frozen=True)
class Layout:
  """Expert groups: `sizes[g]` experts for group g; group g serves modality g (or everything if shared)."""

  group_names: tuple[str, ...]
  sizes: tuple[int, ...]
  shared: bool

  @property
  def num_experts(self) -> int:
    return sum(self.sizes)

  @property
  def starts(self) -> tuple[int, ...]:
    return tuple(int(s) for s in np.cumsum((0,) + self.sizes[:-1]))

  @property
  def expert_group(self) -> np.ndarray:
    """int32 [E]: the group of each expert."""
    return np.repeat(np.arange(len(self.sizes)), self.sizes).astype(np.int32)


def parse_layout(layout: str, modalities: Sequence[str]) -> Layout:
  """'4t4i' / '3t3i2a' / '8shared' → Layout; raises ValueError naming `layout` when it does not fit."""
  modalities = tuple(modalities)
  shared = re.fullmatch(r"(\d+)shared", layout)
  if shared:
    n = int(shared.group(1))
    if n < 1:
      raise ValueError(f"moe.layout={layout!r}: need at least one shared expert")
    return Layout(("shared",), (n,), True)
  letters = [m[:1] for m in modalities]
  if len(set(letters)) != len(letters):
    raise ValueError(f"moe.layout: modalities {modalities} share first letters; layouts cannot name them")
  parts = re.findall(r"(\d+)([a-z])", layout)
  if not parts or "".join(n + c for n, c in parts) != layout:
    raise ValueError(f"moe.layout={layout!r} is not like '4t4i' or '8shared'")
  counts = {}
  for n, c in parts:
    if c not in letters:
      raise ValueError(f"moe.layout={layout!r}: letter {c!r} names no modality in {modalities}")
    if c in counts:
      raise ValueError(f"moe.layout={layout!r}: modality letter {c!r} appears twice")
    if int(n) < 1:
      raise ValueError(f"moe.layout={layout!r}: modality {c!r} needs at least one expert")
    counts[c] = int(n)
  missing = [m for m, c in zip(modalities, letters) if c not in counts]
  if missing:
    raise ValueError(f"moe.layout={layout!r} has no expert group for modalities {missing} of {modalities}; "
                     f"add e.g. '1{missing[0][0]}' or drop them from model.modalities")
  return Layout(modalities, tuple(counts[c] for c in letters), False)


def static_capacity(layout: Layout, capacity_factor: float, num_tokens: int,
                    token_fractions: Sequence[float] | None, per_token: int = 1) -> tuple[int, ...]:
  """Rows each expert of group g can take, known at trace time: ceil(c·k·f_g·M / |E_g|), at most M.

  f_g bounds the fraction of the batch's tokens that belong to group g (config `moe.token_fractions`;
  default equal shares, 1 for a shared group). A batch with more tokens of g than f_g·M keeps the top rows
  only (sown as `capacity_overflow`), so the compute, and the FLOPs, stay fixed by the config.
  """
  g = len(layout.sizes)
  fractions = (1.0 / g,) * g if token_fractions is None else tuple(token_fractions)
  return tuple(min(num_tokens, max(1, math.ceil(capacity_factor * per_token * f * num_tokens / n)))
               for f, n in zip(fractions, layout.sizes))


def logistic_noise(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """g1 - g2 for two Gumbel(0, 1) samples: sigmoid(logit + noise) is a Gumbel-sigmoid sample (τ = 1)."""
  u = jax.random.uniform(key, shape, jnp.float32, 1e-6, 1 - 1e-6)
  return jnp.log(u) - jnp.log1p(-u)


class AuxRouter(nn.Module):
  """Causal stand-in for a batch-level router: sigmoid(SiLU(x·W1_g)·W2_g), per token only.

  W1_g is [d, d/2] per group (a GroupedDense over the modality plan), W2 is [d/2, E] whose columns of group
  g form W2_g. Returns float32 logits [M, E]; columns outside a token's group are meaningless (mask them).
  """

  num_experts: int
  num_groups: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  gmm_impl: str = "auto"

  @nn.compact
  def __call__(self, x_MD: jax.Array, plan: dispatch.Plan) -> jax.Array:
    d = x_MD.shape[-1]
    plan = plan.use_if(self.num_groups > 1)
    rows = plan.dispatch(x_MD)
    h = dispatch.GroupedDense(max(1, d // 2), self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype,
                              gmm_impl=self.gmm_impl, name="w1")(rows, plan)
    logits = dispatch.GroupedDense(self.num_experts, 1, in_axis="mlp", out_axes=("expert",),
                                   dtype=jnp.float32, param_dtype=self.param_dtype,
                                   name="w2")(nn.silu(h), plan)
    return plan.combine(logits, x_MD.shape[:1])


def aux_router_loss(logits_ME: jax.Array, target_ME: jax.Array, allowed_ME: jax.Array):
  """(mean BCE, accuracy) of aux logits against the main router's choices, over same-group pairs only."""
  logits_ME, target_ME = jnp.asarray(logits_ME, jnp.float32), jax.lax.stop_gradient(target_ME)
  target = target_ME.astype(jnp.float32)
  bce = jnp.maximum(logits_ME, 0) - logits_ME * target + jnp.log1p(jnp.exp(-jnp.abs(logits_ME)))
  n = jnp.maximum(allowed_ME.sum(), 1)
  acc = jnp.where(allowed_ME, (logits_ME > 0) == target_ME.astype(bool), False).sum() / n
  return jnp.where(allowed_ME, bce, 0.0).sum() / n, acc


def group_entropy(probs_ME: jax.Array, allowed_ME: jax.Array, valid_M: jax.Array) -> jax.Array:
  """Mean over valid tokens of the entropy of their router scores normalised over their group's experts."""
  p = jnp.where(allowed_ME, probs_ME, 0.0)
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-9)
  ent = -jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-9)), 0.0).sum(-1)
  return jnp.where(valid_M, ent, 0.0).sum() / jnp.maximum(valid_M.sum(), 1)
