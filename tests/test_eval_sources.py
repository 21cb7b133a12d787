"""experiments/eval_sources.py: per-source validation losses partition the trainer's validation loss."""

import json

import pytest

from experiments import eval_sources
from moma import studies


def test_sources_partition_the_trainers_validation_loss(tiny_run, tmp_path, capsys):
  """Token-weighted over the sources, the per-source losses give back the trainer's eval/loss/<m> on the
  same batches (masking the loss changes no activation); a run against itself differs by zero."""
  (tmp_path / "same").symlink_to(tiny_run)
  assert eval_sources.main([str(tmp_path / "same"), "--baseline", str(tiny_run)]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["differences"] and all(r["delta"] == 0 for r in result["differences"])
  run = studies.load_run(tiny_run)
  per_source = {r["source"]: r for r in result["losses"] if r["run"] == run.name}
  assert {"text", "scene_caption", "melody_caption"} <= set(per_source)
  logged = [r for r in run.records if "eval/loss/text" in r][-1]
  for modality in run.modalities:
    parts = [(v[f"loss/{modality}"], v[f"tokens/{modality}"]) for v in per_source.values()
             if v.get(f"tokens/{modality}", 0) > 0]
    combined = sum(loss * tokens for loss, tokens in parts) / sum(tokens for _, tokens in parts)
    assert combined == pytest.approx(logged[f"eval/loss/{modality}"], rel=1e-5), modality


def test_alone_draws_batches_of_one_source(tiny_run):
  """--alone: every row holds the one source, so the text source's loss covers (nearly) every position."""
  run = studies.load_run(tiny_run)
  alone = eval_sources.source_losses(run, 1, alone=True)
  assert {"text", "scene_caption", "melody_caption"} <= set(alone)
  assert alone["text"]["tokens/text"] > 0.95 * run.tokens_per_step()
  assert alone["text"]["tokens/image"] == 0 and 0 < alone["scene_caption"]["loss/image"] < 10
