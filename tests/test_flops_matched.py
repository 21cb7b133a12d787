"""Step-matching ratio and FLOPs savings η on synthetic run directories with known answers."""

import json

import numpy as np
import pytest

from experiments import flops_matched
from moma import metrics
from moma import studies

STEPS = np.arange(10, 2001, 10)
TOKENS_PER_STEP = 4 * 32


def curve(t):
  """A strictly decreasing, saturating loss curve (power law plus a floor)."""
  return 1.5 + 4.0 * (1.0 + np.asarray(t, float) / 50.0) ** -0.7


def write_run(path, speed, *, fpt=1e6, fpt_style="scalar", data="embedded", vocab=512, seed=0):
  """A run whose modality m's loss at step t is curve(t * speed[m]); eval every 100 steps (+0.1)."""
  path.mkdir(parents=True)
  config = {"train": {"steps": int(STEPS[-1]), "batch_size": 4, "seq_len": 32, "seed": seed},
            "model": {"vocab_size": vocab, "modalities": ["text", "image"]}, "data": {"name": data}}
  (path / "config.json").write_text(json.dumps(config))
  lines = []
  for t in STEPS:
    losses = {m: float(curve(t * s)) for m, s in speed.items()}
    record = {"step": int(t), "loss": float(np.mean(list(losses.values()))), "tokens_per_s": 1000.0}
    record.update({f"loss/{m}": v for m, v in losses.items()})
    if fpt_style == "scalar":
      record["flops_per_token"] = fpt
    elif fpt_style == "dict":
      record["flops_per_token"] = {m: fpt for m in speed}
    else:
      record.update({f"flops_per_token/{m}": fpt for m in speed})
    lines.append(json.dumps(record))
    if t % 100 == 0:
      lines.append(json.dumps({"step": int(t), **{f"eval/loss/{m}": v + 0.1 for m, v in losses.items()}}))
  (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  return path


def by_key(rows):
  return {(r["variant"], r["split"], r["modality"]): r for r in rows}


def test_step_ratio_is_inverse_speedup():
  for r in (2.0, 3.0, 1.25):
    out = studies.step_matching(STEPS, curve(STEPS), STEPS, curve(STEPS * r))
    assert out["ratio"] == pytest.approx(1 / r, rel=5e-3)
    b, v = np.asarray(out["pairs"]).T
    late = b >= 100  # early, the curve is steep and linear interpolation between logs is coarse
    np.testing.assert_allclose(v[late], b[late] / r, rtol=2e-2)


def test_slower_variant_matches_only_the_steps_it_reaches():
  out = studies.step_matching(STEPS, curve(STEPS), STEPS, curve(STEPS * 0.5))
  assert out["ratio"] == pytest.approx(2.0, rel=5e-3)
  assert 0 < out["matched"] <= len(STEPS) // 2 < out["of"]


def test_never_reaching_variant_has_no_ratio_or_eta():
  flat = np.full_like(STEPS, 10.0, dtype=float)
  assert studies.step_matching(STEPS, curve(STEPS), STEPS, flat)["ratio"] is None
  assert studies.flops_fraction(STEPS, curve(STEPS), STEPS, flat) is None


def test_smoothing_keeps_lines_and_shrinks_noise():
  line = np.linspace(5.0, 1.0, 50)
  np.testing.assert_allclose(studies.smooth(line, 5)[2:-2], line[2:-2])
  noise = np.random.default_rng(0).normal(0, 0.05, len(STEPS))
  out = studies.step_matching(STEPS, curve(STEPS) + noise, STEPS, curve(STEPS * 2) + noise[::-1], window=9)
  assert out["ratio"] == pytest.approx(0.5, rel=0.05)
  with pytest.raises(ValueError, match="odd"):
    studies.smooth(line, 4)


def test_compare_per_modality_and_split(tmp_path):
  base = studies.load_run(write_run(tmp_path / "dense", {"text": 1, "image": 1}))
  mot = studies.load_run(write_run(tmp_path / "mot", {"text": 2, "image": 4}, fpt_style="dict"))
  rows = by_key(studies.compare(base, mot))
  for split in ("train", "eval"):
    assert rows["mot", split, "text"]["step_ratio"] == pytest.approx(0.5, rel=0.02)
    assert rows["mot", split, "image"]["step_ratio"] == pytest.approx(0.25, rel=0.03)
    assert rows["mot", split, "text"]["flops_fraction"] == pytest.approx(0.5, rel=0.01)
    assert rows["mot", split, "image"]["flops_fraction"] == pytest.approx(0.25, rel=0.01)
    assert rows["mot", split, "image"]["savings"] == pytest.approx(4.0, rel=0.01)
  assert 0.25 < rows["mot", "train", "all"]["flops_fraction"] < 0.5
  assert ("mot", "eval", "all") not in rows  # the runs log no eval/loss


def test_eta_counts_flops_per_token(tmp_path):
  base = studies.load_run(write_run(tmp_path / "dense", {"text": 1, "image": 1}))
  costly = studies.load_run(write_run(tmp_path / "costly", {"text": 2, "image": 2}, fpt=1.5e6,
                                      fpt_style="keys"))
  rows = by_key(studies.compare(base, costly))
  assert rows["costly", "train", "text"]["step_ratio"] == pytest.approx(0.5, rel=0.02)
  assert rows["costly", "train", "text"]["flops_fraction"] == pytest.approx(0.75, rel=0.01)
  total = studies.cumulative_flops(base, np.asarray([2000]))[0]
  assert total == pytest.approx(2000 * TOKENS_PER_STEP * 1e6)


def test_cumulative_flops_follows_changing_flops_per_token(tmp_path):
  run = studies.Run(tmp_path, {"train": {"batch_size": 1, "seq_len": 1}, "model": {}},
                    [{"step": 10, "flops_per_token": 1.0}, {"step": 20, "flops_per_token": 3.0}])
  np.testing.assert_allclose(studies.cumulative_flops(run, np.asarray([5, 10, 15, 20, 30])),
                             [5, 10, 25, 40, 70])


def test_cli_reports_not_reached_and_writes_plots(tmp_path, capsys):
  base = write_run(tmp_path / "dense", {"text": 1, "image": 1})
  fast = write_run(tmp_path / "fast", {"text": 2, "image": 2})
  slow = write_run(tmp_path / "slow", {"text": 0.5, "image": 0.5})
  assert flops_matched.main([str(base), str(base), str(fast), str(slow), "--smooth", "3",
                             "--plot-dir", str(tmp_path / "plots")]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  result = json.loads(out[-1])
  rows = by_key(result["rows"])
  assert {v for v, _, _ in rows} == {"fast", "slow"}  # the baseline is not compared with itself
  assert rows["slow", "train", "text"]["flops_fraction"] == studies.NOT_REACHED
  assert rows["slow", "train", "text"]["step_ratio"] == pytest.approx(2.0, rel=0.02)
  assert rows["fast", "train", "text"]["flops_fraction"] == pytest.approx(0.5, rel=0.02)
  assert any(studies.NOT_REACHED in line for line in out if line.startswith("| slow"))
  for plot in result["plots"]:
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert {p.rsplit("/", 1)[-1] for p in result["plots"]} == {"loss_vs_flops_train.png",
                                                               "loss_vs_flops_eval.png"}


@pytest.mark.parametrize("field,kwargs", [("data", {"data": "other"}), ("model.vocab_size", {"vocab": 256})])
def test_runs_on_different_data_are_refused(tmp_path, capsys, field, kwargs):
  base = write_run(tmp_path / "dense", {"text": 1, "image": 1})
  other = write_run(tmp_path / "other", {"text": 2, "image": 2}, **kwargs)
  with pytest.raises(ValueError, match=field):
    studies.compare(studies.load_run(base), studies.load_run(other))
  with pytest.raises(SystemExit):
    flops_matched.main([str(base), str(other)])
  assert field in capsys.readouterr().err


def test_metrics_reader_drops_only_a_truncated_last_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  assert metrics.read(tmp_path) == [{"step": 1, "loss": 2.0}]
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
  with pytest.raises(ValueError, match="metrics.jsonl line 1 is not JSON"):
    metrics.read(tmp_path)


def test_seeds_give_a_mean_and_a_95_interval(tmp_path, capsys):
  """Variant seeds 0..2 at 2.0x, 2.5x, 1.6x the baseline's speed (paired with the baseline of the same seed):
  the mean ratio and η are the means of the seeds' 1/speed, inside a Student-t interval of half-width
  t(0.975, 2)·sd/√3; a seed without a baseline is left out."""
  speeds = {0: 2.0, 1: 2.5, 2: 1.6, 3: 3.0}
  for seed in range(3):
    write_run(tmp_path / "dense" / f"seed={seed}", {"text": 1, "image": 1}, seed=seed)
  for seed, speed in speeds.items():
    write_run(tmp_path / "mot" / f"seed={seed}", {"text": speed, "image": speed}, seed=seed)
  write_run(tmp_path / "slow" / "seed=1", {"text": 0.5, "image": 0.5}, seed=1)
  assert [r.seed for r in studies.load_group(tmp_path / "mot")] == [0, 1, 2, 3]
  assert studies.load_group(tmp_path / "mot")[1].name == "mot/seed=1"
  assert flops_matched.main([str(tmp_path / "dense"), str(tmp_path / "mot"), str(tmp_path / "slow"),
                             "--plot-dir", str(tmp_path / "plots")]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  row = by_key(result["rows"])["mot", "train", "text"]
  inverse = np.array([1 / speeds[s] for s in range(3)])
  half = 4.302653 * inverse.std(ddof=1) / np.sqrt(3)  # scipy.stats.t.ppf(0.975, 2)
  assert (row["seeds"], row["reached"]) == (3, "3/3")
  assert row["flops_fraction"] == pytest.approx(inverse.mean(), rel=0.01)
  assert row["step_ratio"] == pytest.approx(inverse.mean(), rel=0.02)
  np.testing.assert_allclose(row["flops_fraction_ci95"], [inverse.mean() - half, inverse.mean() + half],
                             rtol=0.02)
  assert row["savings"] == pytest.approx(1 / row["flops_fraction"])
  assert sorted({r["seed"] for r in result["per_seed"] if r["variant"] == "mot"}) == [0, 1, 2]
  slow = by_key(result["rows"])["slow", "train", "text"]
  assert (slow["seeds"], slow["reached"], slow["flops_fraction"]) == (1, "0/1", studies.NOT_REACHED)
  assert slow["step_ratio_ci95"] is None  # one seed: no interval
  assert row["unfinished_seeds"] == ""
  deltas = np.array([curve(STEPS[-1] * speeds[s]) - curve(STEPS[-1]) for s in range(3)])  # paired by seed
  assert row["final_loss_delta"] == pytest.approx(deltas.mean(), rel=0.02)
  np.testing.assert_allclose(row["final_loss_delta_ci95"],
                             deltas.mean() + np.array([-1, 1]) * 4.302653 * deltas.std(ddof=1) / np.sqrt(3),
                             rtol=0.05)
  val = by_key(result["rows"])["mot", "eval", "image"]  # validation: not smoothed, the last eval exactly
  assert val["final_loss_delta"] == pytest.approx(deltas.mean(), rel=1e-6)
  with pytest.raises(ValueError, match="no train.seed in common"):
    studies.compare_seeds(studies.load_group(tmp_path / "dense"), [studies.load_group(tmp_path / "mot")[3]])
  with pytest.raises(ValueError, match="neither config.json nor seed=K"):
    studies.load_group(tmp_path / "plots")
  assert studies.interval95([0.5]) is None


def test_a_run_in_progress_is_left_out_of_the_seeds(tmp_path):
  """A seed still training would read "not reached" (its loss has not got there yet): only pairs of
  finished runs count, and the row names the seeds left out."""
  for seed in range(3):
    write_run(tmp_path / "dense" / f"seed={seed}", {"text": 1, "image": 1}, seed=seed)
    write_run(tmp_path / "mot" / f"seed={seed}", {"text": 2.0, "image": 2.0}, seed=seed)
  in_progress = tmp_path / "mot" / "seed=2" / "metrics.jsonl"
  in_progress.write_text("".join(in_progress.read_text().splitlines(keepends=True)[:50]))
  assert [r.finished for r in studies.load_group(tmp_path / "mot")] == [True, True, False]
  rows, per_seed = studies.compare_seeds(studies.load_group(tmp_path / "dense"),
                                         studies.load_group(tmp_path / "mot"))
  row = by_key(rows)["mot", "train", "text"]
  assert (row["seeds"], row["reached"], row["unfinished_seeds"]) == (2, "2/2", "2")
  assert row["flops_fraction"] == pytest.approx(0.5, rel=0.01)
  assert {r["seed"] for r in per_seed} == {0, 1}
  with pytest.raises(ValueError, match=r"no seed where both .* finished \(in progress: seeds \[2\]\)"):
    studies.compare_seeds(studies.load_group(tmp_path / "dense"), studies.load_group(tmp_path / "mot")[2:])
