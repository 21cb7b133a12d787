"""Shared pieces of every experiment config: `k=v` argument parsing, size presets, the base config.

An experiment file (`configs/NAME.py`) defines `get_config(arg=None)` and passes its own argument keys
to `parse_arg`, e.g. `configs/mot.py:size=tiny,untie=ffn+qkv`. Every field can still be overridden on
the command line (`--config.model.num_layers=4`), because `config_flags` applies overrides afterwards.
"""

from __future__ import annotations

import ml_collections

# Model + train fields per size. 1.4B is MoMa's Table 1; 7B is Chameleon-7B (LLaMA-2 shape + QK-norm).
SIZES = {
    "tiny": dict(d_model=64, num_layers=2, num_heads=4, d_ff=192, seq_len=256, batch_size=4,
                 steps=200, lr=3e-3, warmup_steps=20),
    # CPU studies (docs/studies.md): 2,500 steps × 16 × 256 = 10.2M tokens, est. ~20 min on 2 idle cores
    # (3.2k tokens/s measured for MoT with the cores shared at load ~12; see BENCHMARKS.md).
    "small": dict(d_model=96, num_layers=4, num_heads=4, d_ff=288, seq_len=256, batch_size=16,
                  steps=2500, lr=2e-3, warmup_steps=100),
    # The scaling ladder's two CPU sizes above small (configs/sweeps/scaling.py); train fields by ladder_schedule.
    "medium": dict(d_model=128, num_layers=5, num_heads=4, d_ff=384, seq_len=256),
    "large": dict(d_model=160, num_layers=6, num_heads=5, d_ff=480, seq_len=256),
    "S": dict(d_model=768, num_layers=12, num_heads=12, d_ff=3072, seq_len=1024, batch_size=64,
              steps=20_000, lr=1e-3, warmup_steps=1000),
    "M": dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096, seq_len=2048, batch_size=128,
              steps=50_000, lr=6e-4, warmup_steps=2000),
    "1.4B": dict(d_model=2048, num_layers=24, num_heads=16, d_ff=8192, seq_len=4096, batch_size=256,
                 steps=100_000, lr=4e-4, warmup_steps=4000),
    "7B": dict(d_model=4096, num_layers=32, num_heads=32, d_ff=11008, seq_len=4096, batch_size=1024,
               steps=100_000, lr=1e-4, warmup_steps=4000),
}

CPU_SIZES = ("tiny", "small", "medium", "large")  # float32 and no remat: what a CPU runs fastest

# The scaling ladder's rule (docs/studies.md, "Scaling"): every architecture of a size trains as many tokens as
# LADDER_TOKENS_PER_PARAM × its dense model's non-embedding parameters (Chinchilla's tokens ∝ parameters,
# at a tenth of its 20: what lets the ladder's dense and MoT runs fit one 3-hour sitting on 2 cores) in rows of 8 × 256 tokens, at lr 2e-3 × 96 / d_model
# (tiny's and small's presets follow it: 3e-3 at 64, 2e-3 at 96) after min(100, steps / 10) warmup steps.
LADDER = ("tiny", "small", "medium", "large")
LADDER_TOKENS_PER_PARAM = 2
LADDER_BATCH_SIZE = 8


def non_embedding_params(size: str) -> int:
  """Dense parameters outside the embeddings at `size`: per layer q, k, v, o (4 d²) and SwiGLU (3 d d_ff)."""
  s = SIZES[size]
  return s["num_layers"] * (4 * s["d_model"] ** 2 + 3 * s["d_model"] * s["d_ff"])


def ladder_schedule(size: str) -> dict:
  """The ladder rule's train fields at `size`: steps, batch_size, lr, warmup_steps."""
  s = SIZES[size]
  steps = round(LADDER_TOKENS_PER_PARAM * non_embedding_params(size) / (LADDER_BATCH_SIZE * s["seq_len"]))
  return dict(steps=steps, batch_size=LADDER_BATCH_SIZE, lr=round(2e-3 * 96 / s["d_model"], 6),
              warmup_steps=min(100, steps // 10))


for _size in ("medium", "large"):
  SIZES[_size].update(ladder_schedule(_size))
MODALITIES = ("text", "image", "audio")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "k1=v1,k2=v2" into a ConfigDict over `defaults`; values take the default's type.

  Raises ValueError naming the key for unknown keys and malformed items, so a typo such as
  `configs/mot.py:sise=tiny` fails loudly instead of silently training the default.
  """
  args = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep:
      raise ValueError(f"config argument {item!r}: expected key=value (known keys: {sorted(defaults)})")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is unknown; known keys: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected true or false")
      args[key] = value.lower() in ("true", "1")
    else:
      try:
        args[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(f"config argument {key}={value!r}: expected {type(default).__name__}") from e
  return args


def parse_modalities(value: str) -> tuple[str, ...]:
  """`modalities=` value → tuple, e.g. "text+image" → ("text", "image"); order as in MODALITIES."""
  parts = tuple(p for p in value.split("+") if p)
  unknown = [p for p in parts if p not in MODALITIES]
  if unknown or not parts or len(set(parts)) != len(parts):
    raise ValueError(f"config argument modalities={value!r}: join distinct names from {MODALITIES} "
                     "with '+', e.g. modalities=text+image")
  return tuple(m for m in MODALITIES if m in parts)


def base_config(size: str, modalities: tuple[str, ...] = MODALITIES) -> ml_collections.ConfigDict:
  """The full config (model, train, checkpoint, mesh, data, init) of a dense decoder of `size` over
  `modalities` (the data mixture follows them)."""
  if size not in SIZES:
    raise ValueError(f"config argument size={size!r} is unknown; choose one of {list(SIZES)}")
  s = SIZES[size]
  from moma import data  # Imported here so that `configs/*.py` stay cheap to parse.
  from moma.models import model_config

  c = ml_collections.ConfigDict()
  # ModelConfig's defaults (its sections moe, mod, mamba, diffusion come with the presets that use them),
  # then what this size changes. vocab_size 0: the trainer takes it from moma.data.vocab_size(config.data).
  c.model = {k: v for k, v in model_config.defaults(model_config.ModelConfig).items() if not isinstance(v, dict)}
  c.model.update(
      modalities=modalities, d_model=s["d_model"], num_layers=s["num_layers"], num_heads=s["num_heads"],
      d_ff=s["d_ff"], max_seq_len=s["seq_len"], dtype="float32" if size in CPU_SIZES else "bfloat16",
      remat=size not in CPU_SIZES + ("S",))
  if size == "7B":  # Chameleon-7B's QK-norm: a LayerNorm with bias over each head
    c.model.update(qk_norm=True, qk_norm_kind="layer")
  c.train = ml_collections.ConfigDict(dict(
      steps=s["steps"], batch_size=s["batch_size"], seq_len=s["seq_len"], seed=0,
      lr=s["lr"], min_lr_ratio=0.1, warmup_steps=s["warmup_steps"], schedule="cosine",
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
      log_every={"tiny": 10}.get(size, 50 if size in CPU_SIZES else 100),
      eval_every={"tiny": 100}.get(size, 500 if size in CPU_SIZES else 1000),
      eval_steps={"tiny": 4}.get(size, 8 if size in CPU_SIZES else 50),
      stage="main",  # "main": train everything; "aux_routers": only MoMa's auxiliary routers (steps.STAGES)
      progress_bar=True,
      nan_policy="stop",  # non-finite loss or grad norm: "stop" (keep the good checkpoints) or "skip" the update
      max_skipped_steps=10,  # nan_policy=skip: this many skipped steps in a row stop the run (exit 3)
      # A loss above loss_spike_factor × its recent level (10th percentile of the last 100 calm steps) for
      # loss_spike_steps steps in a row stops the run as a non-finite one does (0: off); checkpoints saved
      # during a spike are not "good" (moma/checkpoint.py keeps the newest good one through rotation).
      # Measured on tiny runs (README, Faults): healthy steps stay under 1.1× for 10 steps in a row.
      loss_spike_factor=2.0, loss_spike_steps=50,
      prefetch=2,  # host batches prepared ahead in a background thread (0: inline)
      peak_flops=0.0,  # FLOP/s per device for perf/mfu; 0: the data sheet's bf16 peak (moma.metrics), if known
      # Parameters that never train and get no optimizer state (moma/freeze.py): a modality name ("text": its
      # untied copies and expert group, LMFusion's recipe) or a path pattern ("layers/mixer/*", fnmatch).
      freeze=(),
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps={"tiny": 100}.get(size, 500 if size in CPU_SIZES else 1000), max_to_keep=3, async_save=True))
  # Start from a trained run's params: the same architecture, or a dense / Mamba run grown into MoT, MoMa or
  # Mixture-of-Mamba (moma.steps.initial_params; docs/training.md, "Growing a pretrained model").
  # upcycle_from is the same thing under its older name.
  c.init = ml_collections.ConfigDict(dict(upcycle_from="", params_from=""))
  # Device mesh (moma/sharding.py, docs/sharding.md): one device by default; e.g. shape=(-1,) for data
  # parallelism over all devices, rules=(("modality", None),) to override the logical → mesh axis rules,
  # distributed=True to call jax.distributed.initialize() (multi-host).
  c.mesh = ml_collections.ConfigDict(dict(shape=(1,), axes=("data",), rules=(), distributed=False))
  c.data = data.default_config(modalities)
  return c


def parse_untie(value: str, presets: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
  """`untie=` value → component tuple: a preset name, or components joined by '+' (e.g. ffn+qkv)."""
  if value in presets:
    return presets[value]
  parts = tuple(p for p in value.split("+") if p)
  known = sorted({c for comps in presets.values() for c in comps})
  for p in parts:
    if p not in known:
      raise ValueError(f"config argument untie={value!r}: unknown component {p!r}; use a preset "
                       f"{sorted(presets)} or components {known} joined by '+'")
  return parts
