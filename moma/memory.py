"""Does a compiled step fit its device? Read from the compiled step's own memory analysis, before the first
step allocates anything, so that a batch too large is refused in one line naming the field and the largest
batch that fits (instead of an allocation error deep inside XLA).
"""

from __future__ import annotations

import os

import jax

from moma import faults



def _size(n: float) -> str:
  return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def device_bytes(device) -> int | None:
  """Memory one device may use: its allocator's limit (GPU, TPU); on CPU the host's RAM shared by this
  process's CPU devices; None when unknown."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except (backends without memory stats raise or return None)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max(1, jax.local_device_count())
  return None


def step_bytes(compiled) -> int | None:
  """Peak bytes per device of a compiled step: its arguments, outputs (less those aliasing donated
  arguments) and temporaries."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
          + analysis.temp_size_in_bytes)


def state_bytes(state) -> int:
  """Bytes of `state` held by one device (its first addressable shard of each array)."""
  leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "addressable_shards")]
  return sum(x.addressable_shards[0].data.nbytes for x in leaves)


def check_fits(compiled, state, *, batch_size: int, field: str, multiple: int, device) -> None:
  """Raises RunError naming `field` when the step needs more than `device` has, with the largest batch
  (a multiple of `multiple`: the batch's shards) that fits by a linear estimate: the state is fixed, the
  rest grows with the batch (kept under 90% of the device, as allocators fragment)."""
  need, limit = step_bytes(compiled), device_bytes(device)
  if need is None or limit is None or need <= limit:
    return
  fixed = state_bytes(state)
  per_row = max(need - fixed, 1) / batch_size
  largest = int((0.9 * limit - fixed) / per_row) // multiple * multiple
  fix = (f"the largest that fits is about {largest}; set e.g. --config.{field}={largest}" if largest > 0 else
         "the model's state alone nearly fills the device; use a smaller model or more devices (config.mesh)")
  raise faults.RunError(f"config.{field}={batch_size} does not fit: the compiled train step needs "
                        f"{_size(need)} per device, the device ({device.device_kind}) has {_size(limit)}; {fix}")
