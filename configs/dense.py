"""Dense early-fusion decoder (Chameleon-style baseline): `configs/dense.py:size=tiny|S|M|1.4B|7B`."""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, size="tiny")
  return common.base_config(args.size)
