r"""Validation loss of finished runs per data source, and its paired difference against a baseline.

  python -m experiments.eval_sources RUN [RUN ...] [--baseline RUN] [--eval_steps N]
  A="/work/studies/architectures,size=small,seeds=3"
  python -m experiments.eval_sources $A/mot $A/moma_4t4i --baseline $A/dense   # seeded runs: paired by seed

The trainer's validation loss averages over every source of `data.mixture`. Within a study's 10M tokens some
sources repeat (the embedded prose and digits) and others never do (the generated scenes and their
captions), so a gain that comes from memorising shows on the first kind only. This evaluates each run's
latest checkpoint on the trainer's own validation batches (`train.eval_steps` of them by default, mixed as
in training, so expert-choice routing sees the same competition) with the loss restricted to one source's
positions at a time (`data.Packer.batch(with_source=True)`). `--alone` evaluates each source on batches
drawn from it only, as a model meets one kind of input at inference: expert-choice routing (which ranks a
batch's tokens against each other) then sees other competition than in training, while MoT and dense
models, whose tokens do not interact outside attention, give the same losses up to sampling. `--aux_routing`
evaluates expert-choice runs that trained auxiliary routers (`configs/moma.py`, stage `aux_routers`) with
per-token routing by those routers (`model.aux_routing`), the MoMa paper's inference mode; for MoE models each
source also reports `experts_per_token` (mean over layers; a dense FFN is 1.0), the FFN compute the routing
spent on it.

Arguments are run directories or seeded run directories (`seed=K/` inside); runs that have not finished
are left out and named. Prints per run and source the loss per modality; with --baseline, per variant,
source and modality the mean of (variant − baseline) over the seeds both finished, with its 95% Student-t
interval (`moma.studies.interval95`; < 0: the variant is better). Last line: JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moma import checkpoint
from moma import cli
from moma import data
from moma import steps
from moma import studies


def source_losses(run: studies.Run, eval_steps: int | None = None, alone: bool = False,
                  aux_routing: bool = False) -> dict[str, dict[str, float]]:
  """{source: {"loss/<modality>": mean over its target tokens, "tokens/<modality>": per batch, and for MoE
  models "experts_per_token": over its positions}} of the run's latest checkpoint on the trainer's first
  `eval_steps` validation batches, the loss restricted to one source's positions at a time (the sources
  partition the trainer's validation loss). `alone`: on batches drawn from that source only instead (as
  at inference on one kind of input). `aux_routing`: a routed run's routers replaced by its trained auxiliary
  routers (`model.aux_routing`, per-token decisions); other runs are evaluated as they are."""
  config = ml_collections.ConfigDict(run.config)
  if aux_routing and (config.model.ffn == "moe" or config.model.get("mod", {}).get("enabled")):
    config.model.aux_routing = True  # build_model refuses routers without trained aux routers, naming the field
  model = steps.build_model(config)
  params = checkpoint.restore_params(str(run.path), "run")
  modalities, loss_fn = tuple(config.model.modalities), steps.model_module(config).loss_fn

  @functools.partial(jax.jit, static_argnums=2)
  def per_source(params, batch, num_sources):
    """One forward pass, scored on each source's positions: [metrics of source 0, 1, ...]."""
    outputs, sown = steps.forward(params, batch, None, model=model, deterministic=True,
                                  collections=("intermediates",))
    # MoE layers sow `chosen` [..., M, E] (token m used expert e): experts per token, mean over layers.
    # Left out when some MoE sees only a Mixture-of-Depths block's selected tokens (M < B·L).
    chosen = [c for path, c in jax.tree_util.tree_leaves_with_path(sown.get("intermediates", {}))
              if "chosen" in jax.tree_util.keystr(path)]
    per_layer = [c.reshape(-1, *c.shape[-2:]).sum(-1).mean(0) for c in chosen]
    experts_M = (jnp.mean(jnp.stack(per_layer), 0)
                 if per_layer and all(e.size == batch["tokens"].size for e in per_layer) else None)
    rows = []
    for index in range(num_sources):
      in_source = batch["source"] == index
      row = loss_fn(outputs, dict(batch, loss_mask=batch["loss_mask"] * in_source), modalities)[1]
      if experts_M is not None:  # over the source's positions; weight "positions" when averaging batches
        row["positions"] = jnp.sum(in_source)
        row["experts_per_token"] = jnp.sum(experts_M * in_source.ravel()) / jnp.maximum(row["positions"], 1)
      rows.append(row)
    return rows

  packer = data.Packer(config.data, split="validation", seq_len=config.train.seq_len)
  packers = [_one_source_packer(config, name) for name in packer.source_names] if alone else [packer]
  rows = {name: [] for name in packer.source_names}
  for use in packers:
    for step in range(eval_steps or config.train.eval_steps):
      batch = use.batch(config.train.seed, step, config.train.batch_size, with_source=True)
      for source_name, row in zip(use.source_names, per_source(params, batch, len(use.source_names))):
        rows[source_name].append(row)
  return {name: _summary(r) for name, r in rows.items()}


def _one_source_packer(config: ml_collections.ConfigDict, name: str) -> data.Packer:
  """The validation packer of `config.data` with every mixture weight but `name`'s set to 0."""
  one = ml_collections.ConfigDict(config.data.to_dict())
  for other in one.mixture:
    one.mixture[other].weight = float(other == name)
  return data.Packer(one, split="validation", seq_len=config.train.seq_len)


def _summary(rows: list[dict]) -> dict[str, float]:
  """Per-batch rows → loss and tokens per modality (token-weighted), experts per token (position-weighted)."""
  out = {k: v for k, v in steps.mean_rows(rows).items() if k.startswith(("loss/", "tokens/"))}
  if "positions" in rows[0]:
    positions = np.array([float(r["positions"]) for r in rows])
    if positions.sum() > 0:
      experts = np.array([float(r["experts_per_token"]) for r in rows])
      out["experts_per_token"] = float(experts @ positions / positions.sum())
  return out


def paired_differences(baselines: dict[int, dict], variants: dict[int, dict]) -> list[dict]:
  """Per source and loss key: mean over common seeds of variant − baseline, with its 95% interval."""
  seeds = sorted(set(baselines) & set(variants))
  rows = []
  for source in variants[seeds[0]] if seeds else ():
    for key in [k for k in variants[seeds[0]][source] if k.startswith("loss/")]:
      deltas = [variants[s][source][key] - baselines[s][source][key] for s in seeds
                if key in baselines[s].get(source, {})]
      if deltas:
        rows.append({"source": source, "loss": key, "seeds": len(deltas), "delta": float(np.mean(deltas)),
                     "delta_ci95": studies.interval95(deltas), "per_seed": [round(d, 4) for d in deltas]})
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", help="run directories or seeded run directories")
  parser.add_argument("--baseline", help="run directory (or seeded) the others are compared with, by seed")
  parser.add_argument("--eval_steps", type=int, help="validation batches (default: the run's train.eval_steps)")
  parser.add_argument("--alone", action="store_true",
                      help="evaluate each source on batches of that source only (routing sees no other source)")
  parser.add_argument("--aux_routing", action="store_true",
                      help="routed runs route with their trained auxiliary routers (model.aux_routing); others as "
                           "they are")
  args = parser.parse_args(argv)
  groups = list(dict.fromkeys(([args.baseline] if args.baseline else []) + args.runs))
  try:
    loaded = {path: studies.load_group(path) for path in groups}
  except ValueError as e:
    parser.error(str(e))
  losses, table = {}, []
  for path, runs in loaded.items():
    finished = [run for run in runs if run.finished]
    if len(finished) < len(runs):
      unfinished = ", ".join(run.name for run in runs if not run.finished)
      print(f"{path}: left out (not finished): {unfinished}", file=sys.stderr)
    losses[path] = {run.seed: source_losses(run, args.eval_steps, args.alone, args.aux_routing) for run in finished}
    table += [{"run": run.name, "source": source, **values}
              for run in finished for source, values in losses[path][run.seed].items()]
  print(studies.markdown_table(table))
  differences = []
  if args.baseline:
    for path in groups[1:]:
      rows = paired_differences(losses[args.baseline], losses[path])
      differences += [{"variant": loaded[path][0].name.split("/")[0], **r} for r in rows]
    print("\n" + studies.markdown_table([{k: v for k, v in r.items() if k != "per_seed"} for r in differences]))
  print(json.dumps({"losses": table, "differences": differences}))
  return 0


if __name__ == "__main__":
  cli.run_argparse(main)
