"""What a person sees: the console's start block, per-log and eval lines, the summary; DIR/loss.png."""

import json
import os
import subprocess
import sys

import pytest

from moma import console
from moma import plotting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def _run_dir(path, rows, modalities=("text", "image")):
  path.mkdir(exist_ok=True)
  config = {"model": {"modalities": list(modalities)}, "train": {"batch_size": 4, "seq_len": 8}}
  (path / "config.json").write_text(json.dumps(config))
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _rows(steps, routing=False):
  rows = []
  for s in steps:
    row = {"step": s, "loss": 5.0 / s, "loss/text": 6.0 / s, "loss/image": 4.0 / s, "flops_per_token": 1e6}
    if routing:
      row["routing/load_balance"] = 1.0 + 1 / s
    rows += [row, {"step": s, "eval/loss": 5.5 / s, "eval/loss/text": 6.5 / s}]
  return rows


def test_run_figures_are_pngs_rewritten_from_the_metrics(tmp_path):
  run = _run_dir(tmp_path / "run", _rows([1, 2]))
  assert plotting.write_run_figures(run) == [os.path.join(run, "loss.png")]
  first = (tmp_path / "run" / "loss.png").read_bytes()
  assert first.startswith(PNG)
  _run_dir(tmp_path / "run", _rows([1, 2, 3, 4]))
  plotting.write_run_figures(run)
  assert (tmp_path / "run" / "loss.png").read_bytes() != first  # Redrawn with the new steps.
  axes = plotting.loss_figure(run).axes
  assert [a.get_xlabel() for a in axes] == ["step", "training FLOPs"]
  assert {l.get_label() for l in axes[0].get_lines()} == {
      "train all", "train text", "train image", "validation all", "validation text"}
  routed = _run_dir(tmp_path / "routed", _rows([1, 2], routing=True))
  assert [os.path.basename(p) for p in plotting.write_run_figures(routed)] == ["loss.png", "routing.png"]
  assert (tmp_path / "routed" / "routing.png").read_bytes().startswith(PNG)


def test_notebooks_draw_losses_with_the_shared_plotting_module():
  for name in ("quickstart.ipynb", "routing.ipynb"):
    with open(os.path.join(REPO, "notebooks", name)) as f:
      cells = ["".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    assert any("plotting.loss_figure(workdir)" in c for c in cells), name
    assert not any(".plot(" in c and "loss/" in c for c in cells), f"{name} draws loss curves itself"


def test_console_lines_and_summary(tiny_config, tmp_path, capsys):
  tiny_config.train.update(steps=20, progress_bar=False)
  run = _run_dir(tmp_path / "run", _rows([10]), tiny_config.model.modalities)
  describe = dict(model="decoder d_model=64", params={"total": 389e3, "active": 242e3},
                  flops_per_token=1.24e6, mixture="text 50%, image_caption 50%")
  out = console.Console(tiny_config, run, describe, start=10)
  out.log(20, {"loss": 4.84, "loss/text": 5.15, "loss/image": 3.54, "tokens_per_s": 12504.0, "lr": 2.9e-3})
  out.eval(20, {"eval/loss": 4.79, "eval/loss/text": 4.64})
  out.timing.update(compile=2.0, train=3.0, eval=1.0)
  out.close()
  out.summary({"step": 20, "loss": 4.84, "loss/text": 5.15, "eval/loss": 4.79, "tokens_per_s": 12504.0},
              os.path.join(run, "checkpoints"))
  text = capsys.readouterr().out
  assert "389k total, 242k active per token · 1.24M training FLOPs/token" in text
  assert f"workdir     {run} · resumed from step 10 · 20 steps" in text
  assert "step     20 · loss 4.840 (text 5.150, image 3.540) · 12.5k tok/s · lr 2.90e-03" in text
  assert "eval     20 · validation loss 4.790 (text 4.640)" in text
  assert "compile 2.0s, train 3.0s, eval 1.0s · 12.5k tok/s" in text
  for command in ("python -m moma.sample --workdir=", "tensorboard --logdir=",
                  "python -m experiments.flops_matched", f"checkpoint  {run}/checkpoints/20"):
    assert command in text, command
  assert (tmp_path / "run" / "loss.png").read_bytes().startswith(PNG)


def _quickstart(workdir, cache, *overrides):
  """The README's quickstart command, shortened by flags."""
  return subprocess.run([sys.executable, "-m", "moma.main", "--config=configs/mot.py:size=tiny",
                         f"--workdir={workdir}", f"--config.data.cache_dir={cache}", *overrides],
                        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO},
                        timeout=600)


@pytest.mark.slow
def test_quickstart_console_is_quiet_and_ends_with_the_summary(tmp_path, data_cache_dir):
  workdir = tmp_path / "quickstart"
  result = _quickstart(workdir, data_cache_dir, "--config.train.steps=10", "--config.train.eval_every=5")
  assert result.returncode == 0, result.stderr
  console_text = result.stdout + result.stderr
  assert "Load dataset info" not in console_text and "Traceback" not in console_text
  lines = [l for l in result.stdout.splitlines() if l.strip()]
  assert lines[0].startswith("moma · decoder") and "fresh start" in result.stdout
  assert lines[-1].startswith("  resume") and any(l.startswith("done · step 10") for l in lines)
  first_png = (workdir / "loss.png").read_bytes()
  assert first_png.startswith(PNG)
  result = _quickstart(workdir, data_cache_dir, "--config.train.steps=15", "--config.train.eval_every=5")
  assert result.returncode == 0 and "resumed from step 10" in result.stdout, result.stderr
  assert (workdir / "loss.png").read_bytes() != first_png  # Redrawn after the resume's eval.
