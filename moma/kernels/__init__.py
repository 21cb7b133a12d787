"""Grouped matmul for expert / modality dispatch (contract: docs/design.md).

`gmm(lhs, rhs, group_sizes)` has `jax.lax.ragged_dot` semantics: rows of lhs [M, K] form contiguous groups
in order, row i is multiplied by rhs[group(i)] (rhs [G, K, N]) and rows past sum(group_sizes) give zeros.
Implementations (`impl`):
  "xla"         static-shape tiled loops (xla.py): the fast path on CPU;
  "pallas_gpu"  Pallas Triton kernel (pallas_gpu.py);
  "pallas_tpu"  Pallas Mosaic TPU kernel in the megablox style (pallas_tpu.py);
  "ragged_dot"  `jax.lax.ragged_dot` with its own autodiff: the baseline;
  "tokamax"     Google's maintained Pallas ragged dot (`pip install tokamax`, extra `.[tokamax]`), with
                its own VJP: Mosaic / Triton on GPU, Mosaic on TPU, named so it never falls back to XLA;
  "reference"   masked dense per group with plain autodiff (reference.py): the test oracle;
  "auto"        the fastest correct one measured for the default backend (today "xla" everywhere).
The fast impls share one `custom_vjp`: d lhs = gmm(dout, rhsᵀ), d rhs = tgmm(lhs, dout) (per-group lhsᵀ·dout).
"""

import functools
import importlib
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

from moma.kernels import layout
from moma.kernels import reference

IMPLS = ("auto", "xla", "ragged_dot", "tokamax", "pallas_gpu", "pallas_tpu", "reference")
# The backends each kernel impl compiles for (the XLA impls run anywhere).
_KERNEL_BACKENDS = {"pallas_gpu": ("gpu",), "pallas_tpu": ("tpu",), "tokamax": ("gpu", "tpu")}
# tokamax's kernels per backend, named: its default order ends in a silent XLA fall-back.
_TOKAMAX_KERNELS = {"gpu": ("mosaic", "triton"), "tpu": ("mosaic",)}


def gmm(lhs, rhs, group_sizes, *, impl="auto", preferred_element_type=None, interpret=False):
  """out[i] = lhs[i] @ rhs[g(i)] where rows are contiguous groups; rows past sum(group_sizes) are zero.

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [G, K, N] one weight matrix per group.
    group_sizes: integer [G] (traced is fine), rows per group in order; sum ≤ M.
    impl: one of IMPLS.
    preferred_element_type: output (and accumulation) dtype; default: result_type(lhs, rhs).
    interpret: run a Pallas impl in interpret mode (any backend; for tests on CPU).
  Returns:
    [M, N] in preferred_element_type.
  """
  _check(lhs, rhs, group_sizes, impl, interpret)
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
  group_sizes = group_sizes.astype(jnp.int32)
  impl = resolve_impl(impl)
  if impl == "reference":
    return reference.gmm(lhs, rhs, group_sizes, out_dtype)
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
  if impl == "tokamax":
    import tokamax  # pylint: disable=g-import-not-at-top (optional dependency)
    return tokamax.ragged_dot(lhs, _vary_like(rhs, lhs), group_sizes, preferred_element_type=out_dtype,
                              implementation=_TOKAMAX_KERNELS[jax.default_backend()])
  return _gmm(lhs, _vary_like(rhs, lhs), group_sizes, impl, out_dtype, interpret)


def _vary_like(rhs, lhs):
  """rhs typed as varying over every manual mesh axis lhs varies over (inside shard_map; else rhs).

  The custom VJP returns d rhs as varying as the rows it was summed from; a weight replicated over those
  axes must enter typed the same way, and autodiff then transposes this cast into the psum that adds every
  device's share of d rhs. Adding a varying scalar zero joins the types without naming the varying-axes API
  (renamed between jax versions); XLA drops the `+ 0`.
  """
  if not jax.sharding.get_abstract_mesh().manual_axes:
    return rhs
  return rhs + layout.varying_zeros((), rhs.dtype, lhs)


def resolve_impl(impl: str) -> str:
  """The concrete impl "auto" stands for on the default backend (others pass through)."""
  if impl != "auto":
    return impl
  # The Pallas kernels pass in interpret mode but have not yet run or been timed on a GPU / TPU: until
  # experiments/bench_gmm.py shows them faster there, "auto" stays on the static-shape XLA path.
  return "xla"


def _ops(impl: str, interpret: bool):
  """(gmm, tgmm) of a fast impl: gmm(lhs, rhs, gs, out_dtype, transpose_rhs), tgmm(lhs, dout, gs, dtype)."""
  if impl == "xla":
    from moma.kernels import xla
    return xla.gmm, xla.tgmm
  module = importlib.import_module(f"moma.kernels.{impl}")
  return (functools.partial(module.gmm, interpret=interpret),
          functools.partial(module.tgmm, interpret=interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, impl, out_dtype, interpret):
  return _ops(impl, interpret)[0](lhs, rhs, group_sizes, out_dtype)


def _gmm_fwd(lhs, rhs, group_sizes, impl, out_dtype, interpret):
  return _gmm(lhs, rhs, group_sizes, impl, out_dtype, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(impl, out_dtype, interpret, residuals, dout):
  lhs, rhs, group_sizes = residuals
  gmm_op, tgmm_op = _ops(impl, interpret)
  grad_dtype = jnp.promote_types(dout.dtype, rhs.dtype)
  dlhs = gmm_op(dout, rhs, group_sizes, grad_dtype, transpose_rhs=True)
  drhs = tgmm_op(lhs, dout, group_sizes, rhs.dtype)
  gs_ct = np.zeros(group_sizes.shape, jax.dtypes.float0)
  return dlhs.astype(lhs.dtype), drhs, gs_ct


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _check(lhs, rhs, group_sizes, impl, interpret):
  if impl not in IMPLS:
    raise ValueError(f"gmm: impl={impl!r} is unknown; use one of {IMPLS}")
  if lhs.ndim != 2:
    raise ValueError(f"gmm: lhs must be [M, K], got shape {lhs.shape}")
  if rhs.ndim != 3:
    raise ValueError(f"gmm: rhs must be [G, K, N], got shape {rhs.shape}")
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"gmm: lhs [M, K={lhs.shape[1]}] and rhs [G, K={rhs.shape[1]}, N] disagree on K")
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"gmm: group_sizes must have shape [G]=({rhs.shape[0]},) to match rhs, "
                     f"got {group_sizes.shape}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"gmm: group_sizes must be an integer array (int32), got {group_sizes.dtype}")
  if not isinstance(group_sizes, jax.core.Tracer) and np.any(np.asarray(group_sizes) < 0):
    raise ValueError(f"gmm: group_sizes must be non-negative, got {np.asarray(group_sizes)}")
  backend = _KERNEL_BACKENDS.get(impl)
  mesh = jax.sharding.get_abstract_mesh()
  partitioned = [a for a in mesh.axis_names if a not in mesh.manual_axes and mesh.shape[a] > 1]
  if backend and not interpret and partitioned:
    raise ValueError(f"gmm: impl={impl!r} runs on each device's own rows, but mesh axes {partitioned} are "
                     "left to the partitioner, which cannot split a Pallas kernel (tensor parallelism of "
                     "grouped matmuls is the XLA impls'): use config.model.gmm_impl='xla' or 'ragged_dot', "
                     "or a mesh without those axes (data, fsdp, expert)")
  if backend and not interpret and jax.default_backend() not in backend:
    emulate = "" if impl == "tokamax" else "pass interpret=True to emulate it, or "
    raise ValueError(f"gmm: impl={impl!r} needs a {' or '.join(b.upper() for b in backend)} (default backend "
                     f"is {jax.default_backend()!r}); {emulate}use impl='xla'")
  if impl == "tokamax" and importlib.util.find_spec("tokamax") is None:
    raise ValueError("gmm: impl='tokamax' needs `pip install tokamax` (or the extra .[tokamax]); or use "
                     "impl='xla'")
