"""Figures of a run directory, shared by the trainer (DIR/loss.png, rewritten at each eval) and notebooks.

Only matplotlib's non-interactive Agg canvas is used here (no pyplot state), so the trainer can draw
from any thread; a notebook shows a returned figure with `display(fig)` (it renders itself as PNG).
"""

from __future__ import annotations

import io
import os
import pathlib

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from moma import studies


class RunFigure(Figure):
  """A Figure that notebooks show as PNG by itself (`_repr_png_`), without pyplot's inline backend."""

  def _repr_png_(self) -> bytes:
    buffer = io.BytesIO()
    self.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _curves(ax, run: studies.Run, x_of) -> None:
  """Training (lines) and validation (dots) loss per modality; colour = modality, "all" thicker."""
  keys = studies.loss_keys(run)
  names = ["all", *run.modalities]
  for split, style in (("train", "-"), ("eval", "o")):
    for modality, key in keys[split]:
      steps, loss = run.series(key)
      if len(loss):
        i = names.index(modality)
        ax.plot(x_of(steps), loss, style, color=f"C{i}", ms=4, lw=2 if modality == "all" else 1.2,
                label=f"{'train' if split == 'train' else 'validation'} {modality}")


def loss_figure(run_dir: str | pathlib.Path) -> Figure:
  """Loss per modality (train and validation) against step and, where FLOPs are logged, against
  cumulative training FLOPs."""
  run = studies.load_run(run_dir)
  try:
    studies.cumulative_flops(run, [0])
    has_flops = True
  except ValueError:  # no flops_per_token logged yet
    has_flops = False
  fig = RunFigure(figsize=(11 if has_flops else 6, 3.6), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2 if has_flops else 1, squeeze=False)[0]
  _curves(axes[0], run, lambda steps: steps)
  axes[0].set(xlabel="step", ylabel="next-token loss (nats)", title=run.name)
  if has_flops:
    _curves(axes[1], run, lambda steps: studies.cumulative_flops(run, steps))
    axes[1].set(xlabel="training FLOPs", xscale="log", title="loss against compute")
    axes[1].xaxis.set_minor_formatter(NullFormatter())  # Minor labels overlap on short runs.
  axes[0].legend(fontsize=7, ncol=2)
  return fig


def routing_figure(run_dir: str | pathlib.Path) -> Figure | None:
  """The logged routing statistics (`routing/*`: expert load, entropy, ...) against step; None for
  runs without routing."""
  run = studies.load_run(run_dir)
  names = sorted({k for r in run.records for k in r if k.startswith("routing/")})
  if not names:
    return None
  fig = RunFigure(figsize=(6, 3.4), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for name in names:
    ax.plot(*run.series(name), label=name.removeprefix("routing/"))
  ax.set(xlabel="step", title=f"{run.name}: routing")
  ax.legend(fontsize=7, ncol=2)
  return fig


def write_run_figures(run_dir: str | pathlib.Path) -> list[str]:
  """DIR/loss.png (and DIR/routing.png for routing runs), each replaced atomically; their paths."""
  written = []
  for name, fig in (("loss.png", loss_figure(run_dir)), ("routing.png", routing_figure(run_dir))):
    if fig is None:
      continue
    path = os.path.join(run_dir, name)
    fig.savefig(path + ".tmp", format="png", dpi=100)
    os.replace(path + ".tmp", path)
    written.append(path)
  return written
