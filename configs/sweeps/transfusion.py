"""Transfusion setting at matched FLOPs: dense vs MoT vs MoMa 4t4i, and Mamba vs Mixture-of-Mamba.

Every run is `configs/transfusion.py` (text by next-token prediction, images as continuous patches by
diffusion) with its architecture's size preset, so MoT, MoMa and MoM keep their baseline's active FLOPs per
token (the results table's `flops_per_token` column). The MoT paper reads its Transfusion headline (the
dense image loss in ~30% of the steps) off `eval/loss/image_diffusion` in this kind of study;
`python -m moma.evaluate` adds generated-digit accuracy and Fréchet distance per run.
"""

BASELINE = "dense"


def get_sweep(size="tiny", objective="ddpm"):
  return [{"name": arch, "config": f"configs/transfusion.py:arch={arch},size={size},objective={objective}"}
          for arch in ("dense", "mot", "moma", "mamba", "mom")]
