"""Mixture-of-Transformers: the dense decoder with per-modality weights for the untied components.

`configs/mot.py:size=tiny,untie=all,modalities=text+image+audio` (defaults). `untie=` takes a preset (all, attn, ffn, ffn_norm, none)
or components joined by '+', e.g. `untie=ffn+qkv+norm` for the MoT ablation over what to untie.
"""

from configs import common

UNTIE_PRESETS = {
    "all": ("qkv", "o", "ffn", "norm", "qk_norm"),
    "attn": ("qkv", "o"),
    "ffn": ("ffn",),
    "ffn_norm": ("ffn", "norm"),
    "none": (),
}


def get_config(arg=None):
  args = common.parse_arg(arg, size="tiny", untie="all", modalities="text+image+audio")
  config = common.base_config(args.size, common.parse_modalities(args.modalities))
  config.model.untie = common.parse_untie(args.untie, UNTIE_PRESETS)
  return config
