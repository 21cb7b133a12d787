"""MoMa design ablation: expert layout x routing x mixture-of-depths, against the dense model.

The MoMa paper compares 4 text + 4 image experts (4t4i) with 8 shared experts, expert-choice with top-k
routing, and adds MoD on top (better loss per FLOP, slower in wall-clock).
"""

from configs.sweeps import axis, product

BASELINE = "dense"


def get_sweep(size="tiny"):
  variants = product(axis("experts", ["4t4i", "8shared"]), axis("routing", ["ec", "topk"]),
                     axis("mod", ["false", "true"]))
  runs = [{"name": "dense", "config": f"configs/dense.py:size={size}"}]
  for v in variants:
    arg = ",".join(f"{k}={val}" for k, val in v.items())
    name = f"moma_{v['experts']}_{v['routing']}" + ("_mod" if v["mod"] == "true" else "")
    runs.append({"name": name, "config": f"configs/moma.py:size={size},{arg}"})
  return runs
