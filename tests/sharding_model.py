"""Sharding test helpers (a compiled sharded train step) and a tiny Linen LM: untied (per-modality)
GroupedDense attention + FFN, plain layers.

Every weight carries logical axis names, so the mesh rules decide all of its sharding; activations are
constrained at layer boundaries with `moma.sharding.constrain`.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moma import dispatch, kernels, sharding


class TinyLM(nn.Module):
  vocab: int = 32
  d_model: int = 16
  d_ff: int = 32
  num_heads: int = 4
  num_groups: int = 4  # modalities (untied weights, `modality` axis)

  @nn.compact
  def __call__(self, batch):
    tokens, modality = batch["tokens"], batch["modality"]
    head_dim = self.d_model // self.num_heads
    embed = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                 ("vocab", "embed")), (self.vocab, self.d_model))
    x = sharding.constrain(jnp.take(embed, tokens, axis=0), ("batch", "length", "embed"))
    plan = dispatch.partition(modality, self.num_groups)
    lead = tokens.shape
    # attention: per-modality q/k/v projections, shared causal softmax attention, plain output projection.
    rows = plan.dispatch(nn.RMSNorm(scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)))(x))
    qkv = [plan.combine(dispatch.GroupedDense((self.num_heads, head_dim), self.num_groups,
                                             out_axes=("heads", "kv"), name=n)(rows, plan), lead)
           for n in ("q", "k", "v")]
    q, k, v = (sharding.constrain(t, ("batch", "length", "heads", "kv")) for t in qkv)
    scores = jnp.einsum("blhk,bmhk->bhlm", q, k) / np.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((lead[1], lead[1]), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    attn = jnp.einsum("bhlm,bmhk->blhk", probs, v)
    w_o = self.param("o", nn.with_logical_partitioning(nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
                                                       ("heads", "kv", "embed")),
                     (self.num_heads, head_dim, self.d_model))
    x = x + jnp.einsum("blhk,hkd->bld", attn, w_o)
    x = sharding.constrain(x, ("batch", "length", "embed"))
    # FFN: per-modality up / down projections over the plan's rows; expert-parallel when the rules put the
    # modality axis on `expert` (the default rules), each device's own rows otherwise.
    init = nn.initializers.lecun_normal(batch_axis=(0,))
    w = {"up": self.param("up", nn.with_logical_partitioning(init, ("modality", "embed", "mlp")),
                          (self.num_groups, self.d_model, self.d_ff)),
         "down": self.param("down", nn.with_logical_partitioning(init, ("modality", "mlp", "embed")),
                            (self.num_groups, self.d_ff, self.d_model))}
    rows = dispatch.run_grouped(_ffn, plan.dispatch(x), plan, w["up"], w["down"], group_axis="modality")
    y = plan.combine(rows, lead)
    x = sharding.constrain(x + y, ("batch", "length", "embed"))
    w_out = self.param("unembed", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                               ("embed", "vocab")), (self.d_model, self.vocab))
    logits = x @ w_out
    return sharding.constrain(logits, ("batch", "length", "vocab"))


def _ffn(rows, group_sizes, up, down):
  return kernels.gmm(nn.gelu(kernels.gmm(rows, up, group_sizes)), down, group_sizes)


def make_batch(batch_size=8, length=8, vocab=32, num_groups=4, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch_size, length + 1), dtype=np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "modality": rng.integers(0, num_groups, (batch_size, length), dtype=np.int32)}


def lm_loss(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def make_train_fns(model, loss=lm_loss, lr=0.3):
  """(init_state(key, batch) → boxed {"params", "opt"}, train_step(state, batch) → state, loss)."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr, momentum=0.9))

  def init_state(key, batch):
    params = model.init(key, batch)["params"]
    return {"params": params, "opt": tx.init(params)}

  def loss_fn(params, batch):
    return loss(model.apply({"params": params}, batch), batch)

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

  return init_state, train_step


def mesh_config(shape, axes, rules=()):
  return ml_collections.ConfigDict({"shape": shape, "axes": axes, "rules": rules})


def setup(model, host_batch, shape, axes, rules=(), loss=lm_loss):
  """(mesh, rules, init_state, compiled sharded train step, sharded batch) for `model` on a mesh."""
  cfg = mesh_config(shape, axes, rules)
  mesh = sharding.mesh_from_config(cfg, jax.devices()[:math.prod(shape)])
  rules = sharding.rules_from_config(cfg)
  init_state, train_step = make_train_fns(model, loss)
  batch = sharding.shard_batch(host_batch, mesh, rules)
  abstract = sharding.abstract_sharded(init_state, mesh, rules, jax.random.key(0), batch)
  state_sh = jax.tree.map(lambda a: a.sharding, abstract)
  with sharding.activate(mesh, rules):
    step = jax.jit(train_step, out_shardings=(state_sh, None))
    step = step.lower(abstract, batch).compile()
  return mesh, rules, init_state, step, batch
