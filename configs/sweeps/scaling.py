"""The scaling study (issue 33): the size ladder × architectures, for `experiments/scaling.py`'s fitted laws.

Sizes `configs/common.LADDER` (tiny, small, medium, large: d_model 64 → 160), each trained by the ladder rule
(`common.ladder_schedule`: 2 tokens per dense non-embedding parameter, rows of 8 × 256, lr 2e-3 × 96 / d_model),
every architecture of a size on its dense model's token budget (FLOPs-matched per token as in
`architectures`; Mamba and MoM at the depths of `configs/mamba.NUM_LAYERS`). Text + image data.
Runs are ordered by what a study cut short needs first: dense and MoT at every size, their second seed at
the two smallest sizes, then MoMa 4t4i, Mamba and MoM at the three smallest sizes (and their second seeds),
then second seeds at medium, MoMa 4t4i at large, dense and MoMa 4t4i's second seeds at large, and Mamba and
MoM at large (each ~80 min on one core).
"""

from configs import common

MODS = "modalities=text+image"
CONFIGS = {
    "dense": f"configs/dense.py:{{size}},{MODS}",
    "mot": f"configs/mot.py:{{size}},untie=ffn+qkv+o+norm,{MODS}",
    "moma_4t4i": "configs/moma.py:{size},experts=4t4i,routing=ec,mod=false",
    "mamba": f"configs/mamba.py:{{size}},{MODS}",
    "mom": f"configs/mom.py:{{size}},untie=in_proj+x_proj+dt_proj+out_proj,{MODS}",
}


def run(arch: str, size: str, seed: int) -> dict:
  """One ladder run, named `ARCH_SIZE/seed=K`, with the ladder rule's schedule and 8 validations."""
  schedule = common.ladder_schedule(size)
  steps = schedule["steps"]
  return {"name": f"{arch}_{size}/seed={seed}", "config": CONFIGS[arch].format(size=f"size={size}"),
          "train.seed": seed, **{f"train.{k}": v for k, v in schedule.items()},
          "train.eval_every": -(-steps // 8), "train.eval_steps": 8,
          "checkpoint.every_steps": -(-steps // 4)}


def get_sweep():
  small_two = common.LADDER[:2]
  runs = [run(a, s, 0) for a in ("dense", "mot") for s in common.LADDER]
  runs += [run(a, s, 1) for a in ("dense", "mot") for s in small_two]
  runs += [run(a, s, 0) for a in ("moma_4t4i", "mamba", "mom") for s in common.LADDER[:3]]
  runs += [run(a, s, 1) for a in ("moma_4t4i", "mamba", "mom") for s in small_two]
  runs += [run(a, "medium", 1) for a in CONFIGS]
  runs += [run("moma_4t4i", "large", 0), run("dense", "large", 1), run("moma_4t4i", "large", 1)]
  runs += [run(a, "large", 0) for a in ("mamba", "mom")]
  return runs
