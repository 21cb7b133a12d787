"""The one script to run on the first GPU / TPU a task is lent (issue 32, item 3; docs/accelerators.md).

  python -m experiments.accelerator_check [--tiny] [--out=experiments/out/accelerator_check.json]
      [--budget_s=330] [--sections=gmm,attention,mfu,largest_batch] [--data_cache_dir=DIR]

Sections, in this order, each skipped item recorded with its reason:
  gmm            `kernels.gmm` forward+backward of every impl that applies to the backend (others listed with
                 the reason), against a dense bf16 matmul of the same FLOPs timed in the same round: the FFN
                 up-projection [rows, d_model] × [G, d_model, d_ff] of sizes S, M, 1.4B (configs/common.py),
                 8192 rows (tokens per device per step), G ∈ {2, 4, 8}, random (multinomial) group sizes.
  attention      `attention.attend` forward+backward of every impl the backend takes, against xla (the
                 reference twin), batch 1, 16 heads of 128 (1.4B's), one causal document, L 2k / 4k / 8k.
  mfu            the trainer's own step (`train.lm_plan` + `loop.StepCache`, refused by `memory.check_fits` as
                 the trainer refuses it) of dense, MoT and MoMa 4t4i (text + image) at S and M, the presets'
                 bf16 / remat / impls, 16k tokens per step; MFU by `moma.metrics` (the data sheet's peak;
                 where it has none, e.g. CPU, the dense matmul's measured FLOP/s from the gmm section).
  largest_batch  dense and MoMa 4t4i at 1.4B: the largest per-device batch whose train step fits
                 (`memory.step_bytes` ≤ `memory.device_bytes`, the rule `memory.check_fits` applies), from
                 steps compiled, never run (`experiments.lower.Steps`): a linear fit of two batch sizes,
                 then a bisection that confirms it. A state (parameters + Adam) larger than the device is
                 0 rows without a compile: MoMa 4t4i at 1.4B holds ~7B parameters, 112 GiB of state.
Timing: a warm-up call (compiles), then the median of 5 calls, each to `block_until_ready`. One time budget
(--budget_s, 330 s: the whole script ≤ 8 min on one H100) is shared out over the sections run (--sections:
a second run can finish what the first skipped); time a section leaves goes to the next, an item past its
section's share is skipped with the reason, and an impl or a section that fails is recorded with its error.

Output: one JSON file (--out; do not commit it) with the machine and every measurement; on stdout the
BENCHMARKS.md block (command, machine line, table rows) and the `gmm_impl=auto` recommendation with its
rule (also in the JSON; it would go into `moma.kernels.resolve_impl`, which this script does not edit),
both written by experiments/accelerator_report.py.
--tiny runs the same code on CPU at tiny shapes, pretending to be a GPU (the TPU kernels refused, the GPU
ones in Pallas interpret mode), one call timed, a 12 MiB pretend device for largest_batch (about 45 s on
a loaded 2-core CPU): tests/test_accelerator_check.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from configs import common, dense, moma as moma_config, mot
from experiments import accelerator_report
from experiments import lower
from moma import cli
from moma import kernels
from moma import loop
from moma import memory
from moma import metrics
from moma import sharding
from moma import train
from moma.layers import attention

DEFAULT_OUT = "experiments/out/accelerator_check.json"
# Each section's share of the budget; a section may also use what the ones before it left.
SHARES = {"gmm": 0.2, "attention": 0.1, "mfu": 0.45, "largest_batch": 0.25}
# The train-step families: config argument → config (text + image data for all three).
FAMILIES = {
    "dense": lambda size: dense.get_config(f"size={size},modalities=text+image"),
    "mot": lambda size: mot.get_config(f"size={size},modalities=text+image"),
    "moma_4t4i": lambda size: moma_config.get_config(f"size={size},experts=4t4i"),
}
NOT_CANDIDATES = {"auto": "stands for one of the others (the choice this script informs)",
                  "reference": "the test oracle (a masked dense matmul per group), not a kernel"}


@dataclasses.dataclass(frozen=True)
class Plan:
  """The shapes of one run: the full check, or --tiny's."""

  gmm_sizes: tuple[str, ...] = ("S", "M", "1.4B")
  gmm_rows: int = 8192
  groups: tuple[int, ...] = (2, 4, 8)
  lengths: tuple[int, ...] = (2048, 4096, 8192)
  heads_dim: tuple[int, int] = (16, 128)
  mfu_sizes: tuple[str, ...] = ("S", "M")
  mfu_tokens: int = 16384
  batch_size: str = "1.4B"
  batch_families: tuple[str, ...] = ("dense", "moma_4t4i")
  mfu_families: tuple[str, ...] = tuple(FAMILIES)
  repeats: int = 5
  # A platform (experiments.lower.PLATFORMS) whose impls are chosen, its Pallas kernels run in interpret mode.
  pretend_platform: str | None = None
  device_bytes: int | None = None  # a pretend device's memory (None: the device's own)

  @property
  def interpret(self) -> bool:
    return self.pretend_platform is not None


# --tiny: the same code at CPU-sized shapes. Its pretend 12 MiB device lies between the tiny dense step at 1
# row (~9 MiB) and at 2 rows (~15 MiB), so the batch search compiles twice (the search itself is unit-tested).
TINY = Plan(gmm_sizes=("tiny",), gmm_rows=256, groups=(4,), lengths=(256,), heads_dim=(2, 32),
            mfu_sizes=("tiny",), mfu_tokens=512, mfu_families=("dense",), batch_size="tiny",
            batch_families=("dense",), repeats=1, pretend_platform="cuda", device_bytes=12 * 2**20)


class Budget:
  """Wall-clock deadlines: the i-th section run ends at start + budget × (its and earlier sections' shares)."""

  def __init__(self, seconds: float, sections: list[str]):
    total = sum(SHARES[n] for n in sections)
    self.ends = dict(zip(sections, itertools.accumulate(SHARES[n] / total for n in sections)))
    self.seconds, self.start, self.deadline = seconds, time.perf_counter(), 0.0

  def enter(self, section: str) -> None:
    self.deadline = self.start + self.seconds * self.ends[section]

  def over(self) -> str | None:
    """Why the next item is skipped, or None while the section has time left."""
    if time.perf_counter() < self.deadline:
      return None
    return f"time budget: the section's share of --budget_s={self.seconds:g} was used up"


def one_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def refusal(fn: Callable, *args) -> str | None:
  """Why moma refuses `fn(*args)` on this backend (its ValueError, from tracing alone), or None."""
  try:
    jax.eval_shape(fn, *args)
  except ValueError as e:
    return one_line(e)
  return None


def median_seconds(calls: dict[str, tuple[Callable, tuple]], repeats: int) -> dict[str, float | str]:
  """{name: median seconds of fn(*args), or the error's line} after one warm-up call each (compiles)."""
  out: dict[str, float | str] = {}
  for name, (fn, args) in calls.items():
    try:
      jax.block_until_ready(fn(*args))
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
      out[name] = float(np.median(times))
    except Exception as e:  # pylint: disable=broad-except (a kernel failing on hardware is a result)
      out[name] = one_line(e)
  return out


def fwd_bwd(forward: Callable) -> Callable:
  """jit of (*primals, cotangent) → (forward's output, its vjp): the output is kept so that XLA cannot
  drop the forward pass."""

  def run(*args):
    out, vjp = jax.vjp(forward, *args[:-1])
    return out, vjp(args[-1])

  return jax.jit(run)


def timed_row(calls, baseline: str, repeats: int) -> dict[str, Any]:
  """One table row: milliseconds per impl, ratio to the baseline's time, and errors by impl."""
  seconds = median_seconds(calls, repeats)
  times = {k: v for k, v in seconds.items() if isinstance(v, float)}
  row = {"ms": {k: 1e3 * v for k, v in times.items()},
         "errors": {k: v for k, v in seconds.items() if isinstance(v, str)}}
  if baseline in times:
    row["ratio"] = {k: v / times[baseline] for k, v in times.items() if k != baseline}
  return row


def applicable(candidates, refuse: Callable[[str], str | None], plan: Plan) -> tuple[list[str], dict]:
  """(impls to time, {impl: why not}) on this backend, or on --tiny's pretend platform."""
  runs, skipped = [], {}
  with lower.target_backend(plan.pretend_platform) if plan.pretend_platform else contextlib.nullcontext():
    for impl in candidates:
      reason = NOT_CANDIDATES.get(impl) or refuse(impl)
      if reason:
        skipped[impl] = reason
      else:
        runs.append(impl)
  return runs, skipped


def measure_items(items: dict[str, Callable[[], dict[str, Any]]], budget: Budget) -> dict[str, list]:
  """{"rows": each item's row, "skipped": each item not measured, with the reason (the budget, an error)}."""
  rows, skipped = [], []
  for name, measure in items.items():
    reason = budget.over()
    if reason is None:
      try:
        rows.append(dict(item=name, **measure()))
        continue
      except Exception as e:  # pylint: disable=broad-except (a step failing on hardware is a result)
        reason = one_line(e)
    skipped.append({"item": name, "reason": reason})
  return {"rows": rows, "skipped": skipped}


def gmm_row(plan: Plan, impls: list[str], size: str, groups: int) -> dict[str, Any]:
  d_model, d_ff = common.SIZES[size]["d_model"], common.SIZES[size]["d_ff"]
  keys = jax.random.split(jax.random.key(groups), 3)
  x = jax.random.normal(keys[0], (plan.gmm_rows, d_model), jnp.bfloat16)
  w = jax.random.normal(keys[1], (groups, d_model, d_ff), jnp.bfloat16) / math.sqrt(d_model)
  ct = jax.random.normal(keys[2], (plan.gmm_rows, d_ff), jnp.bfloat16)
  sizes = np.random.default_rng(groups).multinomial(plan.gmm_rows, np.ones(groups) / groups)
  group_sizes = jnp.asarray(sizes, jnp.int32)
  calls = {"dense": (fwd_bwd(jnp.dot), (x, w[0], ct))}  # its own [K, N] weight: no [G, K, N] gradient
  for impl in impls:
    gmm = functools.partial(kernels.gmm, group_sizes=group_sizes, impl=impl, interpret=plan.interpret)
    calls[impl] = (fwd_bwd(gmm), (x, w, ct))
  row = dict(size=size, rows=plan.gmm_rows, d_model=d_model, d_ff=d_ff, groups=groups,
             **timed_row(calls, "dense", plan.repeats))
  if "dense" in row["ms"]:  # fwd + bwd: three matmuls of 2·rows·d_model·d_ff FLOPs
    row["dense_flops_per_s"] = 6 * plan.gmm_rows * d_model * d_ff / (row["ms"]["dense"] / 1e3)
  return row


def gmm_section(plan: Plan, budget: Budget) -> dict[str, Any]:
  probe = (jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((2, 128, 128), jnp.bfloat16), jnp.ones((2,), jnp.int32))
  refuse = lambda impl: refusal(functools.partial(kernels.gmm, impl=impl), *probe)
  impls, skipped = applicable(kernels.IMPLS, refuse, plan)
  items = {f"{size} {plan.gmm_rows}×{common.SIZES[size]['d_model']}×{common.SIZES[size]['d_ff']} G={groups}":
           functools.partial(gmm_row, plan, impls, size, groups) for size in plan.gmm_sizes for groups in plan.groups}
  return dict(impls=impls, skipped_impls=skipped, **measure_items(items, budget))


def attention_row(plan: Plan, impls: list[str], length: int) -> dict[str, Any]:
  q, k, v, ct = (jax.random.normal(key, (1, length, *plan.heads_dim), jnp.bfloat16)
                 for key in jax.random.split(jax.random.key(length), 4))
  segment = jnp.ones((1, length), jnp.int32)  # one causal document
  calls = {impl: (fwd_bwd(functools.partial(attention.attend, segment_BL=segment, impl=impl,
                                            interpret=plan.interpret)), (q, k, v, ct)) for impl in impls}
  return dict(length=length, **timed_row(calls, "xla", plan.repeats))


def attention_section(plan: Plan, budget: Budget) -> dict[str, Any]:
  probe = jnp.zeros((1, 256, *plan.heads_dim), jnp.bfloat16)
  refuse = lambda impl: refusal(functools.partial(attention.attend, impl=impl), probe, probe, probe,
                                jnp.ones((1, 256), jnp.int32))
  impls, skipped = applicable(attention.IMPLS, refuse, plan)
  heads, dim = plan.heads_dim
  items = {f"L={length} B=1 H={heads} K={dim}": functools.partial(attention_row, plan, impls, length)
           for length in plan.lengths}
  return dict(impls=impls, skipped_impls=skipped, **measure_items(items, budget))


def family_config(family: str, size: str, batch_size: int, data_cache_dir: str):
  config = FAMILIES[family](size)
  config.train.update(batch_size=batch_size, progress_bar=False)
  if data_cache_dir:
    config.data.cache_dir = data_cache_dir
  return train.resolve_config(config)


def train_step_time(config, repeats: int, peak: float | None) -> dict[str, Any]:
  """The trainer's step (lm_plan, StepCache, check_fits) run on its first batch: median seconds, MFU."""
  plan = train.lm_plan(config)
  task = plan.tasks[0]
  state, state_sh, _, _ = plan.init(None)
  cache = loop.StepCache(lambda t: t.step_fn, state_sh, (plan.mesh, plan.rules))
  batch = loop.shard_batch(task.batch_at(0), plan.mesh, plan.rules)
  compiled = cache.compile(task, state, batch)
  memory.check_fits(compiled, state, batch_size=task.batch_size, field=task.batch_field,
                    multiple=sharding.batch_shards(plan.mesh, plan.rules), device=plan.mesh.devices.flat[0])
  state = jax.block_until_ready(compiled(state, batch))[0]  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = jax.block_until_ready(compiled(state, batch))[0]
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  tokens_per_s = task.tokens / seconds
  mfu = metrics.mfu(tokens_per_s, task.flops_per_token, peak, plan.mesh.size) if peak else None
  return dict(step_ms=1e3 * seconds, compile_s=cache.seconds, tokens=task.tokens, tokens_per_s=tokens_per_s,
              flops_per_token=task.flops_per_token, mfu=mfu, dtype=config.model.dtype, remat=config.model.remat,
              gmm_impl=config.model.gmm_impl, attention_impl=config.model.attention_impl)


def mfu_row(plan: Plan, family: str, size: str, peak: float | None, data_cache_dir: str) -> dict[str, Any]:
  batch_size = max(1, plan.mfu_tokens // common.SIZES[size]["seq_len"])
  config = family_config(family, size, batch_size, data_cache_dir)
  return dict(family=family, size=size, **train_step_time(config, plan.repeats, peak))


def mfu_section(plan: Plan, budget: Budget, peak: float | None, peak_source: str,
                data_cache_dir: str) -> dict[str, Any]:
  items = {f"{family} {size}": functools.partial(mfu_row, plan, family, size, peak, data_cache_dir)
           for size in plan.mfu_sizes for family in plan.mfu_families}
  return dict(peak_flops_per_device=peak, peak_source=peak_source, **measure_items(items, budget))


def step_bytes_at(family: str, size: str, batch_size: int, data_cache_dir: str) -> int:
  """Peak bytes per device of the train step compiled (not run) for `batch_size` rows."""
  built = lower.Steps(family_config(family, size, batch_size, data_cache_dir))
  with sharding.activate(built.mesh, built.rules):
    return memory.step_bytes(built.train.lower(built.state, built.batch).compile())


def largest_batch(need: Callable[[int], int], limit: int, budget: Budget) -> dict[str, Any]:
  """Largest batch b with need(b) ≤ limit: the line through need(1), need(2) guesses it, then doubling or
  bisection between a batch that fits and one that does not confirms it (unconfirmed if the budget ends)."""
  tried = {1: need(1)}

  def bounds():  # (largest fitting, smallest failing or None) among the batches tried
    return (max([0] + [b for b, n in tried.items() if n <= limit]),
            min((b for b, n in tried.items() if n > limit), default=None))

  guess = 0
  if tried[1] <= limit:
    tried[2] = need(2)
    guess = max(1, (limit - tried[1]) // max(tried[2] - tried[1], 1) + 1)
    for b in (guess, guess + 1):
      if b not in tried and not budget.over():
        tried[b] = need(b)
  fits, fails = bounds()
  while (fails is None or fails - fits > 1) and not budget.over():
    b = 2 * fits if fails is None else (fits + fails) // 2
    tried[b] = need(b)
    fits, fails = bounds()
  return dict(largest=fits, tried=tried, confirmed=fails == fits + 1, linear_estimate=guess)


def batch_row(plan: Plan, family: str, limit: int, budget: Budget, data_cache_dir: str) -> dict[str, Any]:
  row = dict(family=family, size=plan.batch_size, seq_len=common.SIZES[plan.batch_size]["seq_len"],
             state_bytes=lower.parameters_bytes_per_device(
                 lower.Steps(family_config(family, plan.batch_size, 1, data_cache_dir)).state))
  if row["state_bytes"] > limit:  # e.g. MoMa 4t4i at 1.4B (~7B parameters): no compile can fit it
    return dict(row, largest=0, tried={}, confirmed=True, linear_estimate=0)
  need = functools.partial(step_bytes_at, family, plan.batch_size, data_cache_dir=data_cache_dir)
  found = largest_batch(need, limit, budget)
  found["tried"] = {str(b): n for b, n in sorted(found["tried"].items())}  # batch → bytes, JSON keys
  return dict(row, **found)


def largest_batch_section(plan: Plan, budget: Budget, data_cache_dir: str) -> dict[str, Any]:
  limit = plan.device_bytes or memory.device_bytes(jax.devices()[0])
  items = {f"{family} {plan.batch_size}": functools.partial(batch_row, plan, family, limit, budget, data_cache_dir)
           for family in plan.batch_families}
  return dict(device_bytes=limit, pretend_device=plan.device_bytes is not None, **measure_items(items, budget))


def machine() -> dict[str, Any]:
  device = jax.devices()[0]
  return {"device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
          "jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
          "date": time.strftime("%Y-%m-%d")}


def peak_flops(gmm: dict[str, Any] | None) -> tuple[float | None, str]:
  """The data sheet's bf16 peak of this device (moma.metrics), else the fastest dense matmul measured."""
  peak = metrics.peak_flops_per_device(0.0, jax.devices()[0])
  if peak:
    return peak, "moma.metrics.PEAK_FLOPS (data sheet, dense bf16)"
  measured = [r["dense_flops_per_s"] for r in (gmm or {}).get("rows", []) if "dense_flops_per_s" in r]
  return (max(measured), "measured: the fastest dense matmul of the gmm section") if measured else (None, "none")


def run(args) -> dict[str, Any]:
  plan = TINY if args.tiny else Plan()
  backend = lower.PLATFORMS[plan.pretend_platform] if plan.pretend_platform else jax.default_backend()
  budget = Budget(args.budget_s, args.sections)
  sections: dict[str, Any] = {}
  measure = {"gmm": lambda: gmm_section(plan, budget),
             "attention": lambda: attention_section(plan, budget),
             "mfu": lambda: mfu_section(plan, budget, *peak_flops(sections.get("gmm")), args.data_cache_dir),
             "largest_batch": lambda: largest_batch_section(plan, budget, args.data_cache_dir)}
  for name in args.sections:
    budget.enter(name)
    start = time.perf_counter()
    try:
      result = measure[name]()
    except Exception as e:  # pylint: disable=broad-except (the other sections' numbers still get written)
      result = {"rows": [], "skipped": [{"item": name, "reason": one_line(e)}]}
    sections[name] = dict(result, seconds=time.perf_counter() - start)
  return {"command": " ".join(["python -m experiments.accelerator_check", *args.argv]), "tiny": args.tiny,
          "machine": machine(), "budget_s": args.budget_s, "plan": dataclasses.asdict(plan),
          "sections": sections,
          "gmm_auto": accelerator_report.choose_gmm_auto(sections.get("gmm", {}).get("rows", []), backend),
          "seconds": time.perf_counter() - budget.start}


def section_list(value: str) -> list[str]:
  names = [n for n in value.split(",") if n]
  if not names or set(names) - set(SHARES):
    raise argparse.ArgumentTypeError(f"{value!r}: name sections from {list(SHARES)}, joined by ','")
  return [n for n in SHARES if n in names]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (the test's mode)")
  parser.add_argument("--out", default=DEFAULT_OUT, help="the JSON report's path")
  parser.add_argument("--budget_s", type=float, default=330.0, help="seconds for all sections together")
  parser.add_argument("--sections", type=section_list, default=list(SHARES),
                      help=f"which sections to run, e.g. mfu,largest_batch (default: {','.join(SHARES)})")
  parser.add_argument("--data_cache_dir", default="", help="config.data.cache_dir (default: the config's)")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  args.argv = [a for a in argv if not a.startswith("--data_cache_dir")]
  report = run(args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(accelerator_report.benchmarks_block(report))
  auto = report["gmm_auto"]
  print(f"\ngmm_impl=auto → {auto['impl']} ({auto['rule']}; wins {auto['wins']})\nwould go: {auto['where']}"
        + ("\n(--tiny: interpret-mode times at tiny shapes, not a recommendation)" if args.tiny else ""))
  print(f"JSON: {args.out}")
  return report


if __name__ == "__main__":
  cli.run_argparse(main)
