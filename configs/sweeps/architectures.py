"""Dense vs MoT vs MoMa 4t4i vs 8-shared-expert MoE vs Mamba vs Mixture-of-Mamba at matched FLOPs.

Each config's `size` preset is meant to match the dense model of that size in FLOPs per token (MoT, MoMa
and MoM keep the active parameters per token of their dense counterpart; the results table's
`flops_per_token` column shows whether they do), so the comparison is at equal compute per token; the
papers' headline numbers (MoT 55.8% of dense FLOPs, MoMa 4t4i 3.7x vs 3.0x for 8 shared experts,
MoM 34.8-65.4%) are all read off this kind of study with `experiments/flops_matched.py`.
"""

BASELINE = "dense"


def get_sweep(size="tiny"):
  # Text + image data for every run, as in the MoMa paper (4t4i and 8shared are text + image layouts).
  mods = "modalities=text+image"
  return [
      {"name": "dense", "config": f"configs/dense.py:size={size},{mods}"},
      {"name": "mot", "config": f"configs/mot.py:size={size},untie=ffn+qkv+o+norm,{mods}"},
      {"name": "moma_4t4i", "config": f"configs/moma.py:size={size},experts=4t4i,routing=ec,mod=false"},
      {"name": "moe_8shared", "config": f"configs/moma.py:size={size},experts=8shared,routing=ec,mod=false"},
      {"name": "mamba", "config": f"configs/mamba.py:size={size},{mods}"},
      {"name": "mom", "config": f"configs/mom.py:size={size},untie=in_proj+x_proj+dt_proj+out_proj,{mods}"},
  ]
