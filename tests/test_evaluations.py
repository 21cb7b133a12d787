"""experiments.evaluations: seeds' evaluation.json → mean (interval; seeds) per metric and run."""

import json

import pytest

from experiments import evaluations


def _write(root, run, scores, **settings):
  for seed, score in enumerate(scores):
    (root / run / f"seed={seed}").mkdir(parents=True)
    row = {"generation/accuracy": score, "cfg_scale": 3.0, "num_steps": 250, **settings}
    (root / run / f"seed={seed}" / "evaluation.json").write_text(json.dumps(row))


def test_mean_interval_and_seed_values(tmp_path, capsys):
  _write(tmp_path, "mot", [0.2, 0.3, 0.4])
  _write(tmp_path, "dense", [0.1, 0.1, 0.1])
  assert evaluations.main([str(tmp_path / "mot"), str(tmp_path / "dense")]) == 0
  out = capsys.readouterr().out
  # mean 0.3, half-width t(0.975, 2) · 0.1 / √3 = 0.248
  assert "0.3 (0.0516–0.548; 0.2, 0.3, 0.4)" in out and "0.1 (0.1–0.1; 0.1, 0.1, 0.1)" in out
  assert "cfg_scale" not in out


def test_different_settings_and_missing_evaluations_are_refused(tmp_path):
  _write(tmp_path, "mot", [0.2, 0.3])
  _write(tmp_path, "dense", [0.1, 0.1], cfg_scale=1.0)
  with pytest.raises(ValueError, match="dense: evaluated with cfg_scale"):
    evaluations.table({"mot": evaluations.load(tmp_path / "mot"), "dense": evaluations.load(tmp_path / "dense")})
  with pytest.raises(ValueError, match="no seed=K/evaluation.json"):
    evaluations.load(str(tmp_path / "absent"))
