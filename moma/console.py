"""What a person sees while a run starts, trains and ends (process 0 only).

A short start block (model, parameters, FLOPs per token, mesh, data mixture, workdir, resumed-from);
a progress bar with the loss, per-modality losses and tokens/s, with one compact line per logged step
and per evaluation written above it (tqdm.write, so the bar stays whole); DIR/loss.png redrawn at each
evaluation (moma/plotting.py); and an end-of-run summary with what to do next.
"""

from __future__ import annotations

import collections
import os
import shlex
import sys
import time

import jax
import numpy as np
import tqdm

from moma import flops
from moma import plotting


def describe(config, abstract_params, flops_per_token: float) -> dict:
  """The start block's facts: model, parameters stored ("total") and used per token ("active": only the
  routed experts' FFN share), training FLOPs per token, data mixture."""
  m = config.model
  parts = [m.name, f"d_model={m.d_model}", f"layers={m.num_layers}"]
  for key in ("block", "ffn", "untie"):
    if m.get(key):
      parts.append(f"{key}={'+'.join(m[key]) if isinstance(m[key], tuple) else m[key]}")
  total = float(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params)))
  ffn = flops.ffn_params(m) if m.name == "decoder" else {"total": 0, "active": 0}
  entries = [(n, e.weight) for n, e in config.data.mixture.items() if e.weight > 0]
  weights = sum(w for _, w in entries)
  return dict(model=" ".join(parts), params={"total": total, "active": total - ffn["total"] + ffn["active"]},
              flops_per_token=flops_per_token,
              mixture=", ".join(f"{n} {w / weights:.0%}" for n, w in entries))


def _si(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def _losses(row: dict, prefix: str = "") -> str:
  """'4.84 (text 5.15, image 3.54)' from a metrics row's loss keys."""
  per_modality = [f"{k.removeprefix(prefix + 'loss/')} {v:.3f}" for k, v in row.items()
                  if k.startswith(prefix + "loss/") and v is not None]
  total = row.get(prefix + "loss")
  text = f"{total:.3f}" if total is not None else "n/a"
  return f"{text} ({', '.join(per_modality)})" if per_modality else text


class Console:
  """The run's console. `timing` accumulates wall seconds per phase (compile / train / eval)."""

  def __init__(self, config, workdir: str, describe: dict, start: int):
    self._active = jax.process_index() == 0
    self._workdir, self._steps, self._modalities = workdir, config.train.steps, config.model.modalities
    self.timing = collections.Counter(compile=0.0, train=0.0, eval=0.0)
    self._t_start = time.perf_counter()
    self._bar = None
    if not self._active:
      return
    params = describe["params"]
    mesh = dict(zip(config.mesh.axes, config.mesh.shape))
    self._write("\n".join([
        f"moma · {describe['model']}",
        f"  parameters  {_si(params['total'])} total, {_si(params['active'])} active per token"
        f" · {_si(describe['flops_per_token'])} training FLOPs/token",
        f"  mesh        {mesh} over {jax.device_count()} {jax.devices()[0].platform} device(s)"
        f" · batch {config.train.batch_size} × {config.train.seq_len} tokens",
        f"  data        {describe['mixture']}",
        f"  workdir     {workdir} · {f'resumed from step {start}' if start else 'fresh start'}"
        f" · {self._steps} steps",
    ]))
    self._bar = tqdm.tqdm(total=self._steps, initial=start, unit="step", dynamic_ncols=True,
                          disable=not config.train.progress_bar, file=sys.stdout, leave=False)

  def _write(self, text: str) -> None:
    tqdm.tqdm.write(text, file=sys.stdout)

  def step(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(1)

  def log(self, step: int, row: dict) -> None:
    if not self._active:
      return
    if self._bar is not None:
      postfix = {"loss": f"{row['loss']:.3f}"} if row.get("loss") is not None else {}
      postfix.update({m: f"{row[f'loss/{m}']:.2f}" for m in self._modalities
                      if row.get(f"loss/{m}") is not None})
      postfix["tok/s"] = _si(row["tokens_per_s"])
      self._bar.set_postfix(postfix, refresh=False)
    skipped = f" · skipped {row['skipped_steps']:.0f}" if row.get("skipped_steps") else ""
    self._write(f"step {step:>6} · loss {_losses(row)} · {_si(row['tokens_per_s'])} tok/s"
                f" · lr {row['lr']:.2e}{skipped}")

  def eval(self, step: int, row: dict) -> None:
    if not self._active:
      return
    self._write(f"eval {step:>6} · validation loss {_losses(row, 'eval/')}")
    plotting.write_run_figures(self._workdir)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def summary(self, final: dict, checkpoint_dir: str) -> None:
    if not self._active:
      return
    wall = time.perf_counter() - self._t_start
    t = self.timing
    workdir = shlex.quote(self._workdir)
    lines = [
        f"done · step {final['step']} · train loss {_losses(final)}",
        *([f"  validation loss {_losses(final, 'eval/')}"] if "eval/loss" in final else []),
        f"  wall {wall:.1f}s: compile {t['compile']:.1f}s, train {t['train']:.1f}s, eval {t['eval']:.1f}s"
        + (f" · {_si(final['tokens_per_s'])} tok/s" if "tokens_per_s" in final else ""),
        f"  checkpoint  {checkpoint_dir}/{final['step']}",
        *([f"  loss curves {os.path.join(self._workdir, 'loss.png')}"]
          if os.path.exists(os.path.join(self._workdir, "loss.png")) else []),
        "next:",
        f"  sample       python -m moma.sample --workdir={workdir} --prompt='a handwritten seven.'",
        f"  tensorboard  tensorboard --logdir={shlex.quote(os.path.join(self._workdir, 'tensorboard'))}",
        f"  compare      python -m experiments.flops_matched BASELINE_RUN {workdir}",
        "  resume       run the same command again (raise --config.train.steps to train further)",
    ]
    self._write("\n".join(lines))
