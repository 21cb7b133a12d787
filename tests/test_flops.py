"""Analytic FLOPs against XLA's cost analysis of a compiled train step (value_and_grad)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from moma import flops
from moma.models import decoder

CONFIG = dict(modalities=("text", "image"), vocab_size=256, d_model=128, num_layers=1, num_heads=4,
              num_kv_heads=2, d_ff=384, block="transformer", ffn="dense")


def xla_train_flops_per_token(model, batch):
  variables = jax.eval_shape(model.init, jax.random.key(0), batch)
  params = nn.meta.unbox(variables)["params"]

  def loss(p):
    return decoder.loss_fn(model.apply({"params": p}, batch), batch, model.config.modalities)[0]

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"] / batch["tokens"].size


# XLA's cost analysis counts a while-loop body once, whatever its trip count, so the scanned decoder is
# measured with one layer (the analytic count is linear in num_layers).
def test_dense_matches_xla_cost_analysis():
  b, l = 2, 64
  batch = dict(tokens=jnp.zeros((b, l), jnp.int32), modality=jnp.zeros((b, l), jnp.int32),
               segment=jnp.ones((b, l), jnp.int32), position=jnp.broadcast_to(jnp.arange(l), (b, l)),
               targets=jnp.zeros((b, l), jnp.int32), loss_mask=jnp.ones((b, l)))
  analytic = flops.per_token(CONFIG, l)
  measured = xla_train_flops_per_token(decoder.as_model(CONFIG), batch)
  assert analytic["total"] == pytest.approx(measured, rel=0.1)
  assert analytic["text"] == analytic["image"] == analytic["total"]


def test_mot_active_flops_equal_dense_and_accept_config_dict():
  cfg = ml_collections.ConfigDict(dict(CONFIG, untie=("qkv", "o", "ffn"), head_dim=0))
  assert flops.per_token(cfg, 64) == flops.per_token(CONFIG, 64)


def test_uncounted_combination_is_refused():
  with pytest.raises(ValueError, match="config.model.mod with block='mamba'"):
    flops.per_token(dict(CONFIG, block="mamba", num_layers=2, mod=dict(enabled=True)), 64)
