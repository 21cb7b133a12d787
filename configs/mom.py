"""Mixture-of-Mamba: the Mamba decoder with per-modality projections (arXiv 2501.16295).

`configs/mom.py:size=tiny,untie=all` (default: the paper's four projections in_proj, x_proj, dt_proj,
out_proj; conv1d, A_log, D and the scan stay shared). `untie=` takes a preset (all, all_conv, everything,
none) or components joined by '+', e.g. `untie=in_proj+out_proj` for the paper's ablation, `+conv` to also
untie the depthwise conv and `+norm` for per-modality RMSNorm. Untying adds parameters, not active FLOPs, so
each size matches `configs/mamba.py` (and hence the dense preset) in FLOPs per token.
"""

from configs import common
from configs import mamba
from moma.models.model_config import MAMBA_PROJECTIONS

UNTIE_PRESETS = {
    "all": MAMBA_PROJECTIONS,
    "all_conv": MAMBA_PROJECTIONS + ("conv",),
    "everything": MAMBA_PROJECTIONS + ("conv", "norm"),
    "none": (),
}


def get_config(arg=None):
  args = common.parse_arg(arg, size="tiny", untie="all", modalities="text+image+audio")
  config = mamba.mamba_config(args.size, args.modalities)
  config.model.untie = common.parse_untie(args.untie, UNTIE_PRESETS)
  return config
