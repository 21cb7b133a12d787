"""Transfusion (arXiv 2408.11039): text by next-token prediction, images as continuous patches by diffusion.

`configs/transfusion.py:arch=mot,size=tiny,objective=ddpm,patch_proj=linear` (defaults), over text + image.
`arch=` dense | mot (every component untied) | moma (4t4i expert choice) | mod (dense + Mixture-of-Depths)
| mamba | mom (Mixture-of-Mamba); each is the matching discrete-image config with
`data.image_form="patches"` (p×p pixel patches, `data.patch_size`), a patch projection
(`model.patch_dim`, `model.patch_proj=linear|unet`) and the diffusion objective (`model.diffusion.*`,
`moma.diffusion.DiffusionConfig`: ddpm or flow, λ = loss_weight 5, noise_limit 500, caption_dropout 0.1).
"""

from configs import common
from configs import mamba
from configs import mom
from configs import moma
from configs import mot
from moma.models import decoder
from moma.models import model_config

ARCHS = ("dense", "mot", "moma", "mod", "mamba", "mom")


def _arch_config(arch: str, size: str):
  if arch == "dense":
    return common.base_config(size, ("text", "image"))
  if arch == "mot":
    return mot.get_config(f"size={size},modalities=text+image")
  if arch == "moma":
    return moma.get_config(f"size={size},experts=4t4i")
  if arch == "mod":
    config = common.base_config(size, ("text", "image"))
    config.model.mod = dict(model_config.defaults(model_config.ModConfig), enabled=True)
    return config
  if arch == "mamba":
    return mamba.mamba_config(size, "text+image")
  if arch == "mom":
    return mom.get_config(f"size={size},modalities=text+image")
  raise ValueError(f"config argument arch={arch!r} is unknown; choose one of {ARCHS}")


def get_config(arg=None):
  args = common.parse_arg(arg, arch="mot", size="tiny", objective="ddpm", patch_proj="linear")
  config = _arch_config(args.arch, args.size)
  config.data.image_form = "patches"
  # Images are the embedded digits (grey, one channel): the evaluation's digit classifier reads them back.
  for name, entry in config.data.mixture.items():
    if "scene" in name:
      entry.weight = 0.0
  config.model.patch_dim = config.data.patch_size ** 2
  config.model.patch_proj = args.patch_proj
  config.model.diffusion = dict(model_config.defaults(model_config.DiffusionConfig), objective=args.objective)
  decoder.as_model(dict(config.model, vocab_size=1))  # a bad objective / patch_proj fails here, named
  return config
