"""MoMa: modality-aware experts (and the shared-expert MoE baseline), optionally with Mixture-of-Depths.

`configs/moma.py:size=tiny,experts=4t4i,routing=ec,mod=false` (defaults). `experts=` is a layout
(`moma.layers.routing.parse_layout`): 1t1i, 4t4i, 6t2i, 7t1i (text + image data), 3t3i2a (text, image and
audio), or Nshared (one group of N experts over all modalities, over text + image data). `routing=ec` is
expert choice (the paper's), `topk` token choice. Every `config.model.moe.*` / `config.model.mod.*` field
can be overridden on the command line; stage 2 (aux routers for causal inference) is
`--config.train.stage=aux_routers --config.init.params_from=STAGE1_WORKDIR` with aux routers switched on.
"""

from ml_collections import config_dict

from configs import common
from moma.layers import routing
from moma.models import model_config


def get_config(arg=None):
  args = common.parse_arg(arg, size="tiny", experts="4t4i", routing="ec", mod=False)
  modalities = common.MODALITIES if "a" in args.experts.replace("shared", "") else common.MODALITIES[:2]
  config = common.base_config(args.size, modalities)
  try:
    layout = routing.parse_layout(args.experts, modalities)
  except ValueError as e:
    raise ValueError(f"config argument experts={args.experts!r}: {e}; e.g. experts=4t4i, 3t3i2a or 8shared") from None
  if args.routing not in ("ec", "topk"):
    raise ValueError(f"config argument routing={args.routing!r}: expected ec or topk")
  config.model.ffn = "moe"
  top_k = min(model_config.MoeConfig.top_k, min(layout.sizes))  # token choice: 1 for 1t1i / 7t1i
  config.model.moe = dict(model_config.defaults(model_config.MoeConfig), layout=args.experts, routing=args.routing,
                          top_k=top_k)
  # None by default, a tuple of per-group token-share bounds when set (e.g. "(0.6,0.4)").
  config.model.moe.token_fractions = config_dict.placeholder(tuple)
  config.model.mod = dict(model_config.defaults(model_config.ModConfig), enabled=args.mod)
  config.init.params_from = ""  # stage 2: start from this workdir's params (same architecture)
  return config
