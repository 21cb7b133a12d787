"""What `experiments.accelerator_check` reports from its measurements: the BENCHMARKS.md block (command,
machine, one table per section, what was skipped and why) and the `gmm_impl=auto` choice with its rule."""

from __future__ import annotations

from typing import Any

import numpy as np

from moma import kernels


def choose_gmm_auto(rows: list[dict[str, Any]], backend: str,
                    order: tuple[str, ...] = kernels.IMPLS) -> dict[str, Any]:
  """`gmm_impl=auto` from the gmm rows: the impl fastest on most (shape, groups) rows; a tie goes to the
  lowest geometric mean of the time ratio to dense over the rows, then to `order` (kernels.IMPLS: xla
  first, today's auto)."""
  candidates = [impl for impl in order if any(impl in r["ms"] for r in rows)]
  wins = {impl: 0 for impl in candidates}
  for row in rows:
    timed = {impl: ms for impl, ms in row["ms"].items() if impl in wins}
    if timed:
      wins[min(timed, key=timed.get)] += 1
  geomean = {impl: float(np.exp(np.mean([np.log(r["ratio"][impl]) for r in rows if impl in r.get("ratio", {})]
                                        or [np.inf]))) for impl in candidates}
  best = min(candidates, key=lambda impl: (-wins[impl], geomean[impl], order.index(impl))) if candidates else None
  return {"impl": best, "wins": wins, "geomean_ratio_to_dense": geomean,
          "rule": "fastest impl per (shape, groups) row by fwd+bwd median time; auto = the impl fastest on "
                  "most rows; ties: lowest geometric-mean time ratio to dense, then kernels.IMPLS order",
          "where": f"moma/kernels/__init__.py resolve_impl: return {best!r} when jax.default_backend() == "
                   f"{backend!r} (this script does not edit it)"}


def markdown(header: list[str], rows: list[list[Any]]) -> str:
  cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  lines = [header, ["---"] * len(header), *rows]
  return "\n".join("| " + " | ".join(cell(v) for v in line) + " |" for line in lines)


def timed_cell(row: dict[str, Any], impl: str) -> str:
  if impl in row["ms"]:
    ratio = row.get("ratio", {}).get(impl)
    return f"{row['ms'][impl]:.3g} ms" + (f" ({ratio:.2f}×)" if ratio is not None else "")
  return "error" if impl in row["errors"] else "—"


def benchmarks_block(report: dict[str, Any]) -> str:
  """The BENCHMARKS.md text: command, machine line, one table per section."""
  m, s = report["machine"], report["sections"]
  parts = ["## First contact with hardware (`experiments/accelerator_check.py`, issue 32)",
           f"Command: `{report['command']}`", f"Machine: {m['device_kind']} × {m['device_count']} "
           f"({m['platform']}), jax {m['jax']}, {m['date']}; {report['seconds']:.0f} s in all."]
  if "gmm" in s:
    impls = s["gmm"].get("impls", [])
    parts.append("gmm fwd+bwd, bf16, median ms (ratio to the dense matmul of equal FLOPs):\n" + markdown(
        ["shape (rows×d_model×d_ff)", "G", "dense", "dense TFLOP/s", *impls],
        [[f"{r['size']} {r['rows']}×{r['d_model']}×{r['d_ff']}", r["groups"], timed_cell(r, "dense"),
          r.get("dense_flops_per_s", 0) / 1e12, *[timed_cell(r, i) for i in impls]] for r in s["gmm"]["rows"]]))
  if "attention" in s:
    impls = s["attention"].get("impls", [])
    parts.append("attention fwd+bwd, bf16, median ms (ratio to xla):\n" + markdown(
        ["L", *impls], [[r["length"], *[timed_cell(r, i) for i in impls]] for r in s["attention"]["rows"]]))
  if "mfu" in s:
    peak = s["mfu"].get("peak_flops_per_device")
    parts.append(f"train step (peak {peak or 0:.3g} FLOP/s per device: {s['mfu'].get('peak_source')}):\n"
                 + markdown(["model", "size", "tokens/step", "step ms", "tokens/s", "MFU", "compile s"],
                            [[r["family"], r["size"], r["tokens"], r["step_ms"], r["tokens_per_s"],
                              "—" if r["mfu"] is None else f"{r['mfu']:.1%}", r["compile_s"]]
                             for r in s["mfu"]["rows"]]))
  if "largest_batch" in s:
    gib = s["largest_batch"].get("device_bytes", 0) / 2**30
    parts.append(f"largest per-device batch (compiled step ≤ {gib:.3g} GiB):\n" + markdown(
        ["model", "size", "rows × seq_len", "confirmed", "linear estimate", "state GiB"],
        [[r["family"], r["size"], f"{r['largest']} × {r['seq_len']}", r["confirmed"], r["linear_estimate"],
          r["state_bytes"] / 2**30]
         for r in s["largest_batch"]["rows"]]))
  for name, section in s.items():
    for skip in section.get("skipped", []):
      parts.append(f"skipped ({name}) {skip['item']}: {skip['reason']}")
  return "\n\n".join(parts)
