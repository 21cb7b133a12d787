"""MoT untie ablation: which components to make modality-specific (MoT paper, ablation on untying).

The paper finds untying QKV on top of the FFN adds ~33% image / ~10% text FLOPs savings, the output
projection a little more, and untying the norms almost nothing. The dense model is the reference.
"""

BASELINE = "dense"

UNTIE_SETS = ("ffn", "ffn+qkv", "ffn+qkv+o", "ffn+qkv+o+norm")  # the last one is "all"


def get_sweep(size="tiny"):
  return [{"name": "dense", "config": f"configs/dense.py:size={size}"}] + [
      {"name": "mot_" + untie.replace("+", "_"), "config": f"configs/mot.py:size={size},untie={untie}"}
      for untie in UNTIE_SETS]
