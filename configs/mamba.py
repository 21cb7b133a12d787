"""Mamba decoder (the Mixture-of-Mamba paper's baseline): `configs/mamba.py:size=tiny|small|medium|large|S|M|1.4B,modalities=...`.

Pre-norm RMSNorm → Mamba-1 block → residual, no FFN (d_ff=0), with `MambaConfig`'s defaults (the paper's
d_state 16, expand 2, conv 4, dt_rank ceil(d_model / 16)). Each size keeps the dense preset's width, batch,
length and schedule and takes the depth that matches the dense preset's training FLOPs per token at its
seq_len (`moma.flops.per_token`):

  size   d_model  layers (dense)  Mamba / dense FLOPs per token
  tiny        64     4    (2)     0.94
  small       96     8    (4)     0.94
  medium     128    11    (5)     1.04
  large      160    13    (6)     1.02
  S          768    34   (12)     0.99
  M         1024    74   (24)     1.00
  1.4B      2048    76   (24)     1.01

A Mamba layer (≈ 12.5·d² multiply-adds per token) is lighter than a transformer layer (32·d² plus the L²
attention term), hence ~3× the depth. The Mamba papers' parameter-matched convention (twice the
transformer's depth, e.g. 48 layers at 1.4B) is `--config.model.num_layers=48`.
"""

import ml_collections

from configs import common
from moma.models import model_config

NUM_LAYERS = {"tiny": 4, "small": 8, "medium": 11, "large": 13, "S": 34, "M": 74, "1.4B": 76}


def mamba_config(size: str, modalities: str = "text+image+audio") -> ml_collections.ConfigDict:
  """The dense preset of `size` turned into a plain Mamba decoder (shared by configs/mom.py)."""
  if size not in NUM_LAYERS:
    raise ValueError(f"config argument size={size!r} is unknown; choose one of {list(NUM_LAYERS)}")
  config = common.base_config(size, common.parse_modalities(modalities))
  config.model.update(block="mamba", d_ff=0, num_layers=NUM_LAYERS[size])
  config.model.mamba = model_config.defaults(model_config.MambaConfig)
  return config


def get_config(arg=None):
  args = common.parse_arg(arg, size="tiny", modalities="text+image+audio")
  return mamba_config(args.size, args.modalities)
