"""Device meshes, logical axis rules and sharded state/batches from `config.mesh`.

Layers name their parameter and activation dimensions with logical axes only (`LOGICAL_AXES`); the config
maps them onto a device mesh:

  config.mesh.shape = (-1,)            # one -1 entry takes the remaining devices
  config.mesh.axes  = ("data",)        # mesh axis names, e.g. ("data", "fsdp", "tensor", "expert")
  config.mesh.rules = ()               # ((logical, mesh axis | (mesh axes) | None), ...) overriding
                                       # default_rules(config.mesh.axes)

A trainer uses it like this (nothing else is needed for data, FSDP, tensor and expert sharding):

  maybe_initialize_distributed(config)              # first thing in main, before any other jax call
  mesh, rules = mesh_from_config(config.mesh), rules_from_config(config.mesh)
  batch = shard_batch(host_batch, mesh, rules)       # this process's rows → global arrays
  state, state_sh = init_sharded(create_state, mesh, rules, batch)  # boxed params → sharded, never on one host
  with activate(mesh, rules):                        # makes `constrain` / nn.with_logical_constraint live
    step = jax.jit(train_step, out_shardings=(state_sh, None), donate_argnums=0)
    state, metrics = step(state, batch)
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "modality", "expert", "state",
                "conv")

# Logical → mesh axes, in priority order (flax semantics: a rule applies only while its mesh axes are still
# unused by the array, so `batch` claims the data-like axes first and `embed` then falls back to unsharded
# on activations while parameters shard `embed` over fsdp).
_DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),  # the expert axis is a data axis outside the expert layers
    ("expert", "expert"),
    ("modality", "expert"),  # per-modality (untied) weights: one modality group per expert shard
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("kv", None),
    ("state", None),
    ("conv", None),
)

Rules = tuple[tuple[str, Any], ...]


def default_rules(mesh_axes: Sequence[str] = ("data", "fsdp", "tensor", "expert")) -> Rules:
  """Data/FSDP/tensor/expert rules restricted to the mesh axes present (absent axes are dropped)."""
  rules = []
  for logical, mesh_ax in _DEFAULT_RULES:
    names = (mesh_ax,) if isinstance(mesh_ax, str) else tuple(mesh_ax or ())
    kept = tuple(a for a in names if a in mesh_axes)
    rules.append((logical, kept[0] if len(kept) == 1 else (kept or None)))
  return tuple(rules)


def mesh_from_config(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` of all (or the given) devices; `mesh_config.shape` may hold one -1 for the remaining ones."""
  devices = list(jax.devices() if devices is None else devices)
  shape, axes = tuple(int(s) for s in mesh_config.shape), tuple(mesh_config.axes)
  if len(shape) != len(axes):
    raise ValueError(f"config.mesh.shape {shape} and config.mesh.axes {axes} must have the same length")
  if len(set(axes)) != len(axes):
    raise ValueError(f"config.mesh.axes {axes} repeats an axis name: name each axis once with "
                     "--config.mesh.axes (and one size per axis in --config.mesh.shape)")
  if shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
    raise ValueError(f"config.mesh.shape {shape}: sizes must be >= 1 with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"config.mesh.shape {shape}: {len(devices)} devices are not divisible by {known}")
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
  if math.prod(shape) != len(devices):
    raise ValueError(f"config.mesh.shape {shape} needs {math.prod(shape)} devices but {len(devices)} are "
                     f"available: make the product match, or put -1 on one axis")
  auto = (jax.sharding.AxisType.Auto,) * len(axes)  # GSPMD propagation, as flax logical constraints need
  return jax.make_mesh(shape, axes, axis_types=auto, devices=devices)


def rules_from_config(mesh_config) -> Rules:
  """`mesh_config.rules` (validated) followed by `default_rules(mesh_config.axes)`.

  Config rules take precedence, so a config states only its overrides, e.g. (("modality", None),) keeps
  per-modality weights whole on a mesh whose expert axis does not divide the number of modalities.
  """
  axes = tuple(mesh_config.axes)
  raw = tuple(getattr(mesh_config, "rules", ()) or ())
  rules = []
  for rule in raw:
    if len(rule) != 2:
      raise ValueError(f"config.mesh.rules entry {rule!r} must be a (logical_axis, mesh_axes) pair")
    logical, mesh_ax = rule
    if logical not in LOGICAL_AXES:
      raise ValueError(f"config.mesh.rules: unknown logical axis {logical!r}; known: {LOGICAL_AXES}")
    names = (mesh_ax,) if isinstance(mesh_ax, str) else tuple(mesh_ax or ())
    for name in names:
      if name not in axes:
        raise ValueError(f"config.mesh.rules: logical axis {logical!r} maps to mesh axis {name!r}, which "
                         f"is not in config.mesh.axes {axes}")
    rules.append((logical, names[0] if len(names) == 1 else (names or None)))
  return tuple(rules) + default_rules(axes)


def mesh_spec(logical: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """Logical dimension names → mesh PartitionSpec under `rules` (unmatched names are unsharded)."""
  for name in logical:
    if name is not None and name not in LOGICAL_AXES:
      raise ValueError(f"unknown logical axis {name!r} (known: {LOGICAL_AXES})")
  return nn.logical_to_mesh_axes(tuple(logical), rules)


def _axis_size(mesh: Mesh, entry) -> int:
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  return math.prod(mesh.shape[n] for n in names)


def _check_divisible(path: str, shape: Sequence[int], logical, spec: PartitionSpec, mesh: Mesh):
  for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
    parts = _axis_size(mesh, entry)
    if size % parts:
      name = logical[dim] if logical is not None else None
      raise ValueError(
          f"{path}: dimension {dim} (logical axis {name!r}, size {size}) is not divisible by mesh axis "
          f"{entry!r} (size {parts}); change config.mesh.shape or map {name!r} elsewhere in "
          f"config.mesh.rules (e.g. ({name!r}, None))")


def logical_shardings(abstract_tree, mesh: Mesh, rules: Rules, *, require_boxed: bool = False):
  """NamedShardings for an abstract (e.g. `jax.eval_shape`) tree, matching its unboxed structure.

  Leaves boxed with `nn.LogicallyPartitioned` (Flax parameters made with `nn.with_logical_partitioning`,
  and the optax moments of such parameters: optax maps over the boxes) follow the rules; other leaves are
  replicated. `require_boxed`: an unboxed leaf that is not a scalar (step, count) is an error instead, so
  that no parameter or moment is replicated by accident. Every sharded dimension is checked for
  divisibility, naming the leaf's path in the error.
  """

  def one(path, leaf):
    value = leaf.value if _is_box(leaf) else leaf
    where = jax.tree_util.keystr(path, simple=True, separator="/")
    names = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else None
    if names is None and require_boxed and np.ndim(value):
      raise ValueError(f"{where}: a state leaf of shape {tuple(value.shape)} has no logical axes and would be "
                       "replicated on every device; create the parameter with nn.with_logical_partitioning")
    spec = mesh_spec(names, rules) if names is not None else PartitionSpec()
    _check_divisible(where, value.shape, names, spec, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, _without_empty_boxes(abstract_tree), is_leaf=_is_box)


def _without_empty_boxes(tree):
  """Boxes holding no array (optax's `MaskedNode` for a masked-out parameter) replaced by their contents."""
  empty = lambda x: _is_box(x) and not jax.tree.leaves(x.value)
  return jax.tree.map(lambda x: x.value if empty(x) else x, tree, is_leaf=_is_box)


def _unbox(tree):
  # .unbox() would add a sharding constraint (and fails on a box holding no array).
  return jax.tree.map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def abstract_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args, require_boxed: bool = False):
  """Unboxed `jax.ShapeDtypeStruct` tree of `init_fn(*args)` (boxed) carrying the rules' shardings on `mesh`.

  Nothing is computed: this is the target for an orbax restore onto any mesh (resharding on restore):
  `ocp.StandardCheckpointer().restore(path, abstract_sharded(init_state, new_mesh, rules, key, batch))`.
  `require_boxed`: see `logical_shardings`.
  """
  with activate(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules, require_boxed=require_boxed)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), _unbox(abstract), shardings)


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args, require_boxed: bool = False,
                 abstract=None):
  """Runs `init_fn(*args)` (params, or a whole train state built from boxed params) sharded.

  The init is traced abstractly first to get shapes and logical names (`abstract_sharded`, or the
  caller's `abstract` of the same call), then jitted with out_shardings, so each device creates only its
  own shards. Returns (unboxed state, its NamedSharding tree).
  """
  if abstract is None:
    abstract = abstract_sharded(init_fn, mesh, rules, *args, require_boxed=require_boxed)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  # Flat outputs: static pytree metadata (e.g. a TrainState's tx) differs between traces.
  leaves_fn = lambda *a: jax.tree.leaves(_unbox(init_fn(*a)))
  with activate(mesh, rules):
    leaves = jax.jit(leaves_fn, out_shardings=jax.tree.leaves(shardings))(*args)
  return jax.tree.unflatten(jax.tree.structure(abstract), leaves), shardings


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Mesh + logical rules in scope: trace jitted steps inside it so activation constraints apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint at a layer boundary, e.g. constrain(x_BLD, ("batch", "length", "embed")).

  A no-op outside `activate` (single-device code and unit tests pay nothing).
  """
  return nn.with_logical_constraint(x, tuple(logical))


def mesh_axes(logical: str) -> tuple[str, ...]:
  """The active mesh's axes that logical axis `logical` maps to under the active rules (() without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  spec = nn.logical_to_mesh_axes((logical,))
  entry = spec[0] if spec is not None and len(spec) else None
  axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
  return tuple(a for a in axes if a in mesh.axis_names)


def batch_axes() -> tuple[str, ...]:
  """Mesh axes the batch is split over under the active mesh and rules (() without a mesh, or already
  inside a shard_map over them)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return ()
  return tuple(a for a in mesh_axes("batch") if mesh.shape[a] > 1)


def num_shards() -> int:
  """How many ways `on_shards` splits the tokens (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in batch_axes())


def on_shards(fn: Callable, tokens: Sequence[Any], weights: Sequence[Any] = (),
              weight_specs: Sequence[Any] | None = None):
  """fn(*tokens, *weights) run by every device on its own rows of `tokens` (pytrees of arrays whose leading
  axis is split over the batch mesh axes); its outputs are split the same way. `weights` are whole on every
  device unless `weight_specs` says otherwise (PartitionSpecs over batch mesh axes, e.g. P("expert")).
  Without a mesh, or when a leading axis does not split evenly, it is fn(*tokens, *weights).

  Used by `moma.dispatch` and the routers, so that each device plans over its own tokens; calls nest (an
  inner call inside a shard_map over the batch axes is the plain call)."""
  axes, n = batch_axes(), num_shards()
  leading = [x.shape[0] for x in jax.tree.leaves(tokens)]
  if n == 1 or any(m % n for m in leading):
    return fn(*tokens, *weights)
  token_specs = jax.tree.map(lambda _: PartitionSpec(axes), tuple(tokens))
  if weight_specs is None:
    weight_specs = jax.tree.map(lambda _: PartitionSpec(), tuple(weights))
  return jax.shard_map(fn, in_specs=(*token_specs, *weight_specs), out_specs=PartitionSpec(axes),
                       axis_names=set(axes))(*tokens, *weights)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, L, ...] batch array: B over the data-like axes, the rest per the `length` rule."""
  logical = ("batch", "length") + (None,) * (ndim - 2) if ndim >= 2 else ("batch",)
  return NamedSharding(mesh, mesh_spec(logical, rules))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """How many ways the global batch dimension is split (the global batch size must be a multiple)."""
  return _axis_size(mesh, tuple(batch_sharding(mesh, rules, 1).spec)[0])


def shard_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """Global arrays from this process's rows of the batch (from `moma.data.batches(process_index, count)`).

  Each process passes its local [B / process_count, ...] rows; with one process this is the whole batch.
  """
  out = {}
  for key, local in host_batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    shards = batch_shards(mesh, rules)
    if global_shape[0] % shards:
      raise ValueError(f"batch[{key!r}]: global batch size {global_shape[0]} is not divisible by the "
                       f"{shards} batch shards of mesh {dict(mesh.shape)}; change train.batch_size")
    sharding = batch_sharding(mesh, rules, local.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def maybe_initialize_distributed(config=None) -> bool:
  """One `jax.distributed.initialize()` for multi-process runs; call before any other jax call.

  Enabled by `config.mesh.distributed` (True: auto-detect from the cluster, SLURM / TPU pod / Kubernetes),
  or by the environment: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID) or
  MOMA_DISTRIBUTED=1. Returns whether it initialised. Idempotent.
  """
  mesh_config = getattr(config, "mesh", None) if config is not None else None
  wanted = bool(getattr(mesh_config, "distributed", False)) if mesh_config is not None else False
  wanted = wanted or os.environ.get("MOMA_DISTRIBUTED", "") == "1" or "JAX_COORDINATOR_ADDRESS" in os.environ
  if not wanted or jax.distributed.is_initialized():
    return False
  env = os.environ
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in env:
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
  if "JAX_NUM_PROCESSES" in env:
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in env:
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  return True


_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-reduce|all-gather|all-to-all|ragged-all-to-all|reduce-scatter|"
                         r"collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes each kind of collective produces in an optimized HLO module (`compiled.as_text()`), per device.

  A structural fact of a compiled step: with data parallelism it must not grow with the global batch.
  """
  total: dict[str, int] = {}
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    size = 0
    for dtype, dims in _ARRAY.findall(match.group(1)):
      bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype))
      size += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    total[match.group(2)] = total.get(match.group(2), 0) + size
  return total
