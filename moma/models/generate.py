"""Cached decoding for every decoder (dense, MoT, MoMa, MoD, Mamba, MoM): prefill, one-token steps, sampling.

The decoder keeps each layer's decoding state in the Flax "cache" collection, stacked over layers by
`nn.scan`: attention its rotated keys, values and segment ids (`max_seq_len` slots), Mamba its recurrent
state (`moma.layers.mamba.MambaCache`: the last d_conv - 1 pre-conv inputs and the float32 SSM state).

  logits_BPV, cache = prefill(model, variables, prompt_batch)
  logits_B1V, cache = decode_step(model, variables, cache, tokens_B1, modality_B1, position_B1)
  tokens_BT, modality_BT = generate(model, variables, prompt_batch, num_new_tokens, rng=key)

Decoded tokens continue each row's last prompt document. A Mamba step costs O(1) in the sequence length;
an attention step attends over the `max_seq_len` cache slots (masked past the tokens so far). Prompts of
different lengths are left-padded with `segment` 0, which no later token attends to (attention) and which a
document start wipes (Mamba). Batch-level routing (MoE expert choice, MoD) would let later tokens change
earlier ones, so decoding runs the model with `config.aux_routing=True`: the auxiliary routers decide per
token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from moma.layers import mamba as mamba_layer


def _aux_routed(model):
  """The model decoding runs: per-token (aux router) routing where the model routes over the batch
  (`ModelConfig` refuses a routed model without aux routers, naming the field)."""
  cfg = model.config
  routed = cfg.ffn == "moe" or cfg.mod.enabled
  return model.clone(config=dataclasses.replace(cfg, aux_routing=True)) if routed and not cfg.aux_routing else model


def _cache_length(cache) -> int:
  """Tokens already in a concrete cache (0 when traced: `generate` checks its static lengths instead)."""
  lengths = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(cache)
             if getattr(path[-1], "key", None) == "length"]
  try:
    return max((int(jnp.max(n)) for n in lengths), default=0)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
    return 0


def _params(variables: Mapping[str, Any]) -> dict[str, Any]:
  return {"params": variables["params"]}  # a stale "cache" from init or earlier calls must not leak in


def prefill(model, variables, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Any]:
  """(logits_BPV, cache) for a prompt batch (docs/design.md batch); the cache continues each row's last document.
  A Transfusion prompt (with `patches`) gives the `moma.diffusion.Output`'s logits."""
  out, mutated = _aux_routed(model).apply(_params(variables), batch, mutable=["cache"])
  return getattr(out, "logits", out), mutated["cache"]


def decode_step(model, variables, cache, tokens_B1, modality_B1, position_B1,
                **image) -> tuple[jax.Array, Any]:
  """Feeds the next token(s) of each row's document: (logits_B1V, next cache). Past max_seq_len raises
  when the cache is concrete (inside jit, `generate` checks its static lengths once instead).
  `image`: Transfusion's `patches`, `timestep`, `image_block` of the fed tokens (then the model's
  `moma.diffusion.Output` comes back in place of the logits)."""
  mamba_layer.check_decode_length(_cache_length(cache), tokens_B1.shape[1], model.config.max_seq_len)
  segment_B1 = jnp.broadcast_to(cache["document_B"][:, None], tokens_B1.shape)
  batch = dict(tokens=tokens_B1, modality=modality_B1, segment=segment_B1, position=position_B1, **image)
  logits_B1V, mutated = _aux_routed(model).apply({**_params(variables), "cache": cache}, batch,
                                             mutable=["cache"])
  return logits_B1V, mutated["cache"]


def generate(model, variables, prompt_batch: Mapping[str, jax.Array], num_new_tokens: int, *,
             rng: jax.Array | None = None, temperature: float = 1.0,
             modality_table: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Samples `num_new_tokens` per row after the prompt: (tokens_BT, modality_BT), int32 [B, T].

  rng None: greedy (argmax); else sampling at `temperature`. modality_table: int32 [vocab] modality id of
  each token id (`moma.data.vocabulary(config.data).modality_table()`), so that generated image or audio
  codes take their modality's weights; None keeps each row's last prompt modality. The decode loop is one
  `lax.scan`; the compiled program is kept per (model, num_new_tokens) for the last 8.
  """
  prompt_len = prompt_batch["tokens"].shape[1]
  if num_new_tokens <= 0:
    raise ValueError(f"generate: num_new_tokens={num_new_tokens} must be > 0")
  mamba_layer.check_decode_length(prompt_len, num_new_tokens, model.config.max_seq_len)
  greedy = rng is None
  return _compiled(model, num_new_tokens)(
      _params(variables), dict(prompt_batch), jax.random.key(0) if greedy else rng,
      jnp.float32(temperature), jnp.bool_(greedy), modality_table)


@functools.lru_cache(maxsize=8)
def _compiled(model, num_new_tokens):
  """A jitted `_generate` per (model, num_new_tokens): a model (its frozen config) is hashable."""
  return jax.jit(functools.partial(_generate, model, num_new_tokens=num_new_tokens))


def _generate(model, variables, prompt_batch, rng, temperature, greedy, modality_table, *, num_new_tokens):
  def pick(logits_BV, key, last_modality_B):
    sampled_B = jax.random.categorical(key, logits_BV / temperature, axis=-1)
    token_B = jnp.where(greedy, jnp.argmax(logits_BV, axis=-1), sampled_B).astype(jnp.int32)
    modality_B = last_modality_B if modality_table is None else jnp.take(modality_table, token_B)
    return token_B, modality_B.astype(jnp.int32)

  keys = jax.random.split(rng, num_new_tokens)
  logits_BPV, cache = prefill(model, variables, prompt_batch)
  first = pick(logits_BPV[:, -1], keys[0], prompt_batch["modality"][:, -1])
  next_position_B = prompt_batch["position"][:, -1] + 1

  def step(carry, key):
    (token_B, modality_B), position_B, cache = carry
    logits_B1V, cache = decode_step(model, variables, cache, token_B[:, None], modality_B[:, None],
                                    position_B[:, None])
    new = pick(logits_B1V[:, 0], key, modality_B)
    return (new, position_B + 1, cache), new

  _, (tokens_TB, modality_TB) = jax.lax.scan(step, (first, next_position_B, cache), keys[1:])
  tokens_BT = jnp.concatenate([first[0][:, None], tokens_TB.T], axis=1)
  modality_BT = jnp.concatenate([first[1][:, None], modality_TB.T], axis=1)
  return tokens_BT, modality_BT
