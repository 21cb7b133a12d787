"""Mamba / Mixture-of-Mamba block: decoding equals the full forward, MoM reduces to Mamba, causality,
document resets, untie switches, reference inits, the decode length limit."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma import dispatch
from moma.layers import mamba
from moma.models.model_config import MAMBA_PROJECTIONS, MambaConfig

D_MODEL, G, L = 16, 3, 12
ALL = MAMBA_PROJECTIONS + ("conv",)


def block(scan_impl="auto", chunk_size=64, **kw):
  config = MambaConfig(d_state=4, scan_impl=scan_impl, chunk_size=chunk_size)
  return mamba.MambaBlock(config, **{"d_model": D_MODEL, "num_modalities": G, **kw})


@pytest.fixture(scope="module")
def data():
  x = jax.random.normal(jax.random.key(0), (2, L, D_MODEL))
  modality = jax.random.randint(jax.random.key(1), (2, L), 0, G)
  return x, modality


def init(m, x, modality, seed=2):
  return jax.jit(m.init)(jax.random.key(seed), x, dispatch.partition(modality, G))


def param_shapes(m, x, modality):
  """{path: shape} without running anything (trace only)."""
  tree = jax.eval_shape(m.init, jax.random.key(0), x, dispatch.partition(modality, G))["params"]
  return {"/".join(k.key for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]}


def apply(m, **static):
  """Jitted forward; `return_cache=True`: also the MambaCache, the decoder's decode path (`Block._recurrent`)."""
  return jax.jit(lambda v, x, mod, **kw: m.apply(v, x, dispatch.partition(mod, G), **static, **kw))


@jax.jit
def randomize(variables, seed=3):
  """Perturb every parameter so that zero-initialised or symmetric parts cannot hide bugs."""
  leaves, tree = jax.tree.flatten(nn.meta.unbox(variables))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
                                   for p, k in zip(leaves, keys)])


class Compiled:
  """One block with perturbed variables and its jitted forward and prefill / decode step, shared by the tests
  that use the same block."""

  def __init__(self, data, **kw):
    x, modality = data
    self.m = block(**kw)
    self.v = randomize(init(self.m, x, modality))
    self.apply, self.step = apply(self.m), apply(self.m, return_cache=True)


@pytest.fixture(scope="module")
def mamba_block(data):
  return Compiled(data, scan_impl="sequential")


@pytest.fixture(scope="module")
def mom_block(data):
  # chunks of 5: the prefill test's prompt is one whole chunk, the packing test's second document starts mid-chunk
  return Compiled(data, untie=ALL, scan_impl="chunked", chunk_size=5)


@pytest.mark.parametrize("which", ["mamba_block", "mom_block"])
def test_prefill_then_steps_equals_full_forward(data, which, request):
  x, modality = data
  c = request.getfixturevalue(which)
  v, step = c.v, c.step
  full = c.apply(v, x, modality)
  split = 5
  y, cache = step(v, x[:, :split], modality[:, :split])
  assert cache.conv_BKD.shape == (2, 3, 2 * D_MODEL)
  assert cache.ssm_BDN.shape == (2, 2 * D_MODEL, 4) and cache.ssm_BDN.dtype == jnp.float32
  ys = [y]
  for t in range(split, L):
    y, cache = step(v, x[:, t:t + 1], modality[:, t:t + 1], cache=cache)
    ys.append(y)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), full, rtol=1e-5, atol=1e-5)
  assert int(cache.length) == L
  # the cache matters: the empty state continues like a fresh forward, not like the prompt
  empty = mamba.MambaCache.zeros(2, 2 * D_MODEL, 4)
  y_fresh, _ = step(v, x[:, -1:], modality[:, -1:], cache=empty)
  np.testing.assert_allclose(y_fresh, c.apply(v, x[:, -1:], modality[:, -1:]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(y_fresh, full[:, -1:], atol=1e-3)


def test_mom_with_equal_weights_per_modality_is_mamba(data, mamba_block, mom_block):
  x, modality = data
  y_dense = mamba_block.apply(mamba_block.v, x, modality)
  tiled = jax.tree.map(lambda p, q: jnp.broadcast_to(p, q.shape), mamba_block.v, mom_block.v)
  np.testing.assert_allclose(mom_block.apply(tiled, x, modality), y_dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["mamba_block", "mom_block"])
def test_causal(data, which, request):
  x, modality = data
  c = request.getfixturevalue(which)
  t = 6
  y = c.apply(c.v, x, modality)
  y2 = c.apply(c.v, x.at[:, t].add(1.0), modality)
  np.testing.assert_allclose(y2[:, :t], y[:, :t], rtol=1e-6, atol=1e-6)
  assert np.abs(y2[:, t:] - y[:, t:]).max(axis=-1).min() > 1e-6


def test_packed_documents_do_not_leak(data, mom_block):
  # conv and scan restart at document starts (every scan impl's reset is checked in test_selective_scan)
  x, modality = data
  v, f, prefill = mom_block.v, mom_block.apply, mom_block.step
  cut = L // 2  # documents [0, 6) and [6, 12) in row 0; row 1 holds one document
  segment = jnp.array([[1] * cut + [2] * (L - cut), [1] * L])
  packed = f(v, x, modality, segment_BL=segment)
  # both documents of row 0, each alone in a row of its own (one compilation for both)
  docs = lambda a: jnp.concatenate([a[:1, :cut], a[:1, cut:]])
  alone = f(v, docs(x), docs(modality))
  np.testing.assert_allclose(packed[0, :cut], alone[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, cut:], alone[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[1], f(v, x, modality)[1], rtol=1e-5, atol=1e-5)
  # prefill over a packed prompt continues its last document only
  _, cache = prefill(v, x, modality, segment_BL=segment)
  _, cache_alone = prefill(v, docs(x), docs(modality))
  for a, b in ((cache.conv_BKD, cache_alone.conv_BKD), (cache.ssm_BDN, cache_alone.ssm_BDN)):
    np.testing.assert_allclose(a[:1], b[1:], rtol=1e-5, atol=1e-5)


PARAMS_OF = {"in_proj": {"in_proj/kernel"}, "x_proj": {"x_proj/kernel"},
             "dt_proj": {"dt_proj/kernel", "dt_bias"}, "out_proj": {"out_proj/kernel"},
             "conv": {"conv_kernel", "conv_bias"}}


@pytest.mark.parametrize("component", ALL)
def test_each_untie_switch_changes_exactly_its_parameters(data, component):
  x, modality = data
  tied, untied = param_shapes(block(), x, modality), param_shapes(block(untie=(component,)), x, modality)
  assert tied.keys() == untied.keys()
  changed = {k for k in tied if tied[k] != untied[k]}
  assert changed == PARAMS_OF[component]
  for k in changed:
    assert untied[k] == (G, *tied[k])


def test_reference_inits(data):
  x, modality = data
  m = block(num_layers=4, param_dtype=jnp.bfloat16)
  p = nn.meta.unbox(init(m, x, modality)["params"])
  d_inner = 2 * D_MODEL
  assert p["A_log"].dtype == jnp.float32 and p["D"].dtype == jnp.float32
  assert p["in_proj"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_allclose(-jnp.exp(p["A_log"]), -np.tile(np.arange(1, 5), (d_inner, 1)), rtol=1e-6)
  np.testing.assert_array_equal(p["D"], np.ones(d_inner))
  dt = jax.nn.softplus(p["dt_bias"].astype(jnp.float32))
  assert float(dt.min()) >= 1e-3 * 0.99 and float(dt.max()) <= 1e-1 * 1.01
  # out_proj: torch default bound 1/sqrt(fan_in), divided by sqrt(num_layers)
  bound = 1 / math.sqrt(d_inner) / math.sqrt(4)
  out = np.abs(np.asarray(p["out_proj"]["kernel"], np.float32))
  assert out.max() <= bound * 1.01 and out.max() > 0.8 * bound
  rank = mamba.dt_rank_for(D_MODEL)
  assert rank == 1 and p["dt_proj"]["kernel"].shape == (rank, d_inner)


def test_flops_match_parameter_count(data):
  x, modality = data
  for untie in ((), ALL):
    shapes = param_shapes(block(untie=untie), x, modality)
    kernels = sum(math.prod(shapes[f"{k}/kernel"]) for k in ("in_proj", "x_proj", "dt_proj", "out_proj"))
    kernels //= G if untie else 1  # a token uses one modality's weights: active FLOPs do not change
    d_inner = 2 * D_MODEL
    expected = 2 * kernels + 9 * d_inner * 4 + (2 * 4 + 10) * d_inner
    assert mamba.mamba_flops_per_token(MambaConfig(d_state=4), D_MODEL) == expected


def test_a_sequence_past_max_len_raises(data):
  x, modality = data
  with pytest.raises(ValueError, match="max_len"):
    param_shapes(block(max_len=8), x, modality)


def test_decoding_past_max_len_raises(data):
  x, modality = data
  m = block(max_len=L)
  v = init(m, x, modality)
  _, cache = apply(m, return_cache=True)(v, x, modality)
  with pytest.raises(ValueError, match="max_len"):
    m.apply(v, x[:, :1], dispatch.partition(modality[:, :1], G), cache=cache, return_cache=True)
  with pytest.raises(ValueError, match="max_len"):
    mamba.check_decode_length(L - 2, 3, L)
  mamba.check_decode_length(L - 2, 2, L)
