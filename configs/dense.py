"""Dense early-fusion decoder (Chameleon-style baseline).

`configs/dense.py:size=tiny|small|S|M|1.4B|7B,modalities=text+image+audio|text+image` (defaults: tiny, all three).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, size="tiny", modalities="text+image+audio")
  return common.base_config(args.size, common.parse_modalities(args.modalities))
