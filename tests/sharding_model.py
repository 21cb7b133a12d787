"""A tiny Linen LM for the sharding tests: untied (per-modality) GroupedDense attention + FFN, plain layers.

Every weight carries logical axis names, so the mesh rules decide all of its sharding; activations are
constrained at layer boundaries with `moma.sharding.constrain`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moma import dispatch, expert_parallel, kernels, sharding


class TinyLM(nn.Module):
  vocab: int = 32
  d_model: int = 16
  d_ff: int = 32
  num_heads: int = 4
  num_groups: int = 4  # modalities (untied weights, `modality` axis)
  expert_parallel: bool = False  # FFN through moma.expert_parallel (all_to_all) instead of GSPMD

  @nn.compact
  def __call__(self, batch):
    tokens, modality = batch["tokens"], batch["modality"]
    head_dim = self.d_model // self.num_heads
    embed = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                 ("vocab", "embed")), (self.vocab, self.d_model))
    x = sharding.constrain(jnp.take(embed, tokens, axis=0), ("batch", "length", "embed"))
    plan = dispatch.make_plan(modality, self.num_groups)
    lead = tokens.shape
    # attention: per-modality q/k/v projections, shared causal softmax attention, plain output projection.
    rows = plan.sort(nn.RMSNorm(scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)))(x))
    qkv = [plan.unsort(dispatch.GroupedDense((self.num_heads, head_dim), self.num_groups,
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
    # FFN: per-modality up / down projections, via GSPMD on the global sort plan or expert-parallel.
    init = nn.initializers.lecun_normal(batch_axis=(0,))
    w = {"up": self.param("up", nn.with_logical_partitioning(init, ("modality", "embed", "mlp")),
                          (self.num_groups, self.d_model, self.d_ff)),
         "down": self.param("down", nn.with_logical_partitioning(init, ("modality", "mlp", "embed")),
                            (self.num_groups, self.d_ff, self.d_model))}
    if self.expert_parallel:
      y = expert_parallel.grouped(_ffn, x.reshape(-1, self.d_model), modality.reshape(-1), w,
                                  num_groups=self.num_groups).reshape(x.shape)
    else:
      y = plan.unsort(_ffn(plan.sort(x), plan, w), lead)
    x = sharding.constrain(x + y, ("batch", "length", "embed"))
    w_out = self.param("unembed", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                               ("embed", "vocab")), (self.d_model, self.vocab))
    logits = x @ w_out
    return sharding.constrain(logits, ("batch", "length", "vocab"))


def _ffn(rows, plan, w):
  h = nn.gelu(kernels.gmm(rows, w["up"], plan.group_sizes))
  return kernels.gmm(h, w["down"], plan.group_sizes)


def make_batch(batch_size=8, length=8, vocab=32, num_groups=4, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch_size, length + 1), dtype=np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "modality": rng.integers(0, num_groups, (batch_size, length), dtype=np.int32)}


def make_train_fns(model, lr=0.3):
  """(init_state(key, batch) → boxed {"params", "opt"}, train_step(state, batch) → state, loss, grads)."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr, momentum=0.9))

  def init_state(key, batch):
    params = model.init(key, batch)["params"]
    return {"params": params, "opt": tx.init(params)}

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss, grads

  return init_state, train_step
