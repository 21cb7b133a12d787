"""Mixture-of-Mamba per-projection ablation: untie one projection at a time, then all four.

The MoM paper decouples the input, intermediate (x, dt) and output projections by modality and finds the
combination better than any single one; the conv and the state matrix A stay shared. Plain Mamba is the
reference.
"""

from moma.models.model_config import MAMBA_PROJECTIONS

BASELINE = "mamba"


def get_sweep(size="tiny"):
  untie_sets = [(p,) for p in MAMBA_PROJECTIONS] + [MAMBA_PROJECTIONS]
  runs = [{"name": "mamba", "config": f"configs/mamba.py:size={size}"}]
  for untie in untie_sets:
    name = "mom_" + ("all" if untie == MAMBA_PROJECTIONS else untie[0])
    runs.append({"name": name, "config": f"configs/mom.py:size={size},untie={'+'.join(untie)}"})
  return runs
