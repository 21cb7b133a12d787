"""Mixture-of-Transformers: the dense decoder with per-modality weights for the untied components.

`configs/mot.py:size=tiny,untie=all,modalities=text+image+audio` (defaults). `untie=` takes a preset (all, attn, ffn, ffn_norm, none)
or components joined by '+', e.g. `untie=ffn+qkv+norm` for the MoT ablation over what to untie. `all` unties
every weight the model has: `qk_norm` only on presets with QK-norm (7B).
"""

from configs import common
from moma.models.model_config import UNTIE_COMPONENTS

UNTIE_PRESETS = {
    "all": UNTIE_COMPONENTS["transformer"],
    "attn": ("qkv", "o"),
    "ffn": ("ffn",),
    "ffn_norm": ("ffn", "norm"),
    "none": (),
}


def get_config(arg=None):
  args = common.parse_arg(arg, size="tiny", untie="all", modalities="text+image+audio")
  config = common.base_config(args.size, common.parse_modalities(args.modalities))
  config.model.untie = untie_components(args.untie, config.model)
  return config


def untie_components(value: str, model) -> tuple[str, ...]:
  """`untie=` → components; the preset "all" unties every weight `model` has (qk_norm only with QK-norm)."""
  untie = common.parse_untie(value, UNTIE_PRESETS)
  if value == "all" and not model.qk_norm:
    untie = tuple(c for c in untie if c != "qk_norm")
  return untie
