"""Scaling-law fits, bootstrap intervals and η(C) on synthetic runs drawn from known laws."""

import json
import math
import pathlib

import numpy as np
import pytest

from experiments import scaling as scaling_cli
from moma import scaling
from moma import studies

TOKENS_PER_STEP = 4 * 32
D_MODELS = (32, 48, 64, 96, 128)
# Per modality: the true law; A·C^(−α) ≈ 1 at C = 1e11, about the smallest budget below.
LAWS = {"all": scaling.Law(1.5, 0.35 * math.log(1e11), 0.35),
        "text": scaling.Law(1.8, 0.30 * math.log(1e11), 0.30),
        "image": scaling.Law(1.0, 0.45 * math.log(1e11) + math.log(1.5), 0.45)}
CONFIGS = {"dense": {}, "mot": {"untie": ["qkv", "o", "ffn", "norm"]}, "mamba": {"block": "mamba"},
           "mom": {"block": "mamba", "untie": ["in_proj", "x_proj", "dt_proj", "out_proj"]}}


def make_run(path, arch="dense", d_model=32, seed=0, *, noise=0.005, noise_seed=None, speedup=1.0,
             modalities=("text", "image"), data="embedded", vocab=512, evals=True):
  """A Run in the trainer's format whose validation loss of modality m at training FLOPs C is
  LAWS[m](speedup·C)·(1 + noise); larger models cost more per token and train longer."""
  fpt, steps = 1e6 * (d_model / 32) ** 2, int(1000 * d_model / 32)
  config = {"model": {"d_model": d_model, "num_layers": 2, "vocab_size": vocab, "modalities": list(modalities),
                      **CONFIGS[arch]},
            "train": {"steps": steps, "batch_size": 4, "seq_len": 32, "seed": seed}, "data": {"name": data}}
  rng = np.random.default_rng(noise_seed if noise_seed is not None else (d_model, seed))
  records = []
  for step in range(50, steps + 1, 50):
    records.append({"step": step, "loss": 3.0, **{f"loss/{m}": 3.0 for m in modalities},
                    "flops_per_token": fpt, "tokens_per_s": 1000.0})
    if evals and step % 250 == 0:
      flops = step * TOKENS_PER_STEP * fpt * speedup
      records.append({"step": step, **{scaling.eval_key(m): float(LAWS[m](flops) * (1 + noise * rng.standard_normal()))
                                       for m in ("all", *modalities)}})
  return studies.Run(pathlib.Path(path), config, records)


def write(run):
  run.path.mkdir(parents=True)
  (run.path / "config.json").write_text(json.dumps(run.config))
  (run.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.records))
  return run.path


def ladder(root, arch="dense", seeds=(0,), sizes=D_MODELS, **kwargs):
  return [make_run(f"{root}/{arch}_d{d}/seed={s}", arch, d, s, **kwargs) for d in sizes for s in seeds]


def by(rows, **match):
  return [r for r in rows if all(r[k] == v for k, v in match.items())]


def covers(ci, value):
  return ci is not None and ci[0] <= value <= ci[1]


def test_fit_law_recovers_a_noiseless_law():
  flops = np.geomspace(1e11, 1e14, 8)
  for law in LAWS.values():
    fit = scaling.fit_law(flops, law(flops))
    assert fit.E == pytest.approx(law.E, rel=1e-3)
    assert fit.alpha == pytest.approx(law.alpha, rel=1e-3)
    assert fit.log_A == pytest.approx(law.log_A, rel=1e-3)


def test_fits_recover_the_law_within_their_intervals():
  study = scaling.fit_study(ladder("mem", seeds=(0, 1)), replicates=30)
  rows = scaling.law_rows(study)
  assert len(rows) == 2 * 3  # final and curve × all, text, image
  covered = []
  for row in rows:
    truth = LAWS[row["modality"]]
    covered += [covers(row[f"{name}_ci95"], value) for name, value in
                (("E", truth.E), ("A", truth.A), ("alpha", truth.alpha))]
    assert row["alpha"] == pytest.approx(truth.alpha, abs=0.05) and row["E"] == pytest.approx(truth.E, rel=0.05)
  assert np.mean(covered) >= 0.85, covered  # 18 intervals at 95%: a miss or two is expected


def _coverage(replicates, bootstrap):
  """Share of synthetic studies (independent noise) whose α and E intervals cover the truth."""
  hits = []
  for i in range(replicates):
    runs = [make_run(f"mem/d{d}/seed={s}", d_model=d, seed=s, modalities=(), noise=0.01,
                     noise_seed=(i, d, s)) for d in D_MODELS for s in (0, 1)]
    study = scaling.fit_study(runs, replicates=bootstrap, seed=i)
    for row in scaling.law_rows(study):
      hits += [covers(row["alpha_ci95"], LAWS["all"].alpha), covers(row["E_ci95"], LAWS["all"].E)]
  return np.mean(hits)


def test_intervals_cover_the_truth_roughly_at_their_rate():
  assert _coverage(replicates=5, bootstrap=20) >= 0.6  # cheap: a tolerant bound


@pytest.mark.slow
def test_intervals_cover_the_truth_at_about_95_percent():
  assert 0.8 <= _coverage(replicates=40, bootstrap=200) <= 1.0


def test_eta_is_exactly_one_for_a_variant_identical_to_the_baseline():
  base = ladder("mem", seeds=(0, 1), sizes=D_MODELS[:3])
  twin = [make_run(str(r.path).replace("dense", "mot"), "mot", r.config["model"]["d_model"], r.seed) for r in base]
  study = scaling.fit_study(base + twin, replicates=10)
  rows = scaling.eta_rows(study, study.flops_grid())
  assert rows and all(r["eta"] == 1.0 and r["eta_ci95"] == [1.0, 1.0] for r in rows)
  extrapolated = [r for r in scaling.extrapolation_rows(study) if r["architecture"] == "mot"]
  assert extrapolated and all(r["eta"] == 1.0 for r in extrapolated)


def test_eta_of_a_law_shifted_in_compute_is_the_shift():
  k, flops = 2.5, np.geomspace(1e10, 1e15, 7)
  for law in LAWS.values():
    faster = scaling.Law(law.E, law.log_A - law.alpha * math.log(k), law.alpha)  # faster(C) = law(k·C)
    np.testing.assert_allclose(scaling.eta(law, faster, flops), 1 / k, rtol=1e-12)
  assert np.isnan(scaling.eta(LAWS["all"], scaling.Law(2.0, 0.0, 0.3), [1e12])).all()  # never reaches 1.5 + …


def test_eta_recovers_a_known_speedup_from_runs():
  k = 2.0
  runs = [r for arch, speedup in (("dense", 1.0), ("mot", k))
          for r in ladder("mem", arch, seeds=(0, 1), speedup=speedup, modalities=("image",))]
  study = scaling.fit_study(runs, replicates=25)
  rows = scaling.eta_rows(study, study.flops_grid(3))
  assert len(rows) == 2 * 2 * 3  # fit kinds × (all, image) × budgets
  assert all(row["eta"] == pytest.approx(1 / k, rel=0.1) for row in rows), rows
  assert np.mean([covers(row["eta_ci95"], 1 / k) for row in rows]) >= 0.75  # 12/12 here


@pytest.mark.parametrize("model, label", [
    ({"block": "transformer", "untie": [], "ffn": "dense"}, "dense"),
    ({"untie": ["qkv", "o", "ffn", "norm"]}, "mot"),
    ({"untie": ["ffn"]}, "mot_ffn"),
    ({"ffn": "moe", "moe": {"layout": "4t4i", "routing": "ec"}, "mod": {"enabled": False}}, "moma_4t4i"),
    ({"ffn": "moe", "moe": {"layout": "8shared", "routing": "topk"}, "mod": {"enabled": True}},
     "moe_8shared_topk_mod"),
    ({"block": "mamba", "untie": []}, "mamba"),
    ({"block": "mamba", "untie": ["in_proj", "x_proj", "dt_proj", "out_proj"]}, "mom"),
    ({"block": "mamba", "untie": ["in_proj"]}, "mom_in_proj"),
])
def test_architecture_labels(model, label):
  assert scaling.architecture({"model": model}) == label


def error_line(capsys, args):
  with pytest.raises(SystemExit):
    scaling_cli.main([*map(str, args), "--replicates", "5"])
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ")
  return lines[0]


@pytest.mark.parametrize("kwargs, field", [({"data": "other"}, "'data'"), ({"vocab": 999}, "model.vocab_size")],
                         ids=["data", "tokenizer"])
def test_runs_on_other_data_or_tokens_are_refused_naming_the_run(tmp_path, capsys, kwargs, field):
  dirs = [write(r) for r in ladder(tmp_path, sizes=D_MODELS[:3])]
  odd = write(make_run(tmp_path / "odd", "mot", **kwargs))
  line = error_line(capsys, [*dirs, odd])
  assert str(odd) in line and field in line


def test_a_run_without_validation_rows_is_refused_naming_it(tmp_path, capsys):
  dirs = [write(r) for r in ladder(tmp_path, sizes=D_MODELS[:3])]
  blind = write(make_run(tmp_path / "blind", "mot", evals=False))
  line = error_line(capsys, [*dirs, blind])
  assert str(blind) in line and "no validation rows" in line


def test_fewer_budgets_than_parameters_are_refused_naming_the_runs(tmp_path, capsys):
  dirs = [write(r) for r in ladder(tmp_path, sizes=D_MODELS[:3])]
  two = [write(r) for r in ladder(tmp_path, "mot", sizes=D_MODELS[:2])]
  line = error_line(capsys, [*dirs, *two])
  assert "architecture mot" in line and all(str(p) in line for p in two) and "2 distinct" in line


def test_cli_writes_tables_json_and_a_figure_per_modality(tmp_path, capsys):
  for arch in CONFIGS:
    for run in ladder(tmp_path / "study", arch, sizes=D_MODELS[:3], seeds=(0, 1)):
      write(run)
  (tmp_path / "study" / "results.csv").write_text("run,status\n")
  groups = sorted((tmp_path / "study").iterdir())  # a shell glob: seeded runs' directories and a table
  out, figures = tmp_path / "scaling.json", tmp_path / "figures"
  assert scaling_cli.main([*map(str, groups), "--json", str(out), "--figures", str(figures),
                           "--replicates", "8"]) == 0
  printed = capsys.readouterr().out
  assert "## Fitted laws" in printed and "MoMa 1.4B" in printed and "skipped files" in printed
  result = json.loads(out.read_text())
  assert {r["architecture"] for r in result["runs"]} == set(CONFIGS)
  assert len(result["laws"]) == len(CONFIGS) * 2 * 3
  assert {(r["variant"], r["baseline"]) for r in result["eta"]} == {("mot", "dense"), ("mamba", "dense"),
                                                                    ("mom", "mamba")}
  assert sorted(p.name for p in figures.iterdir()) == [f"scaling_{m}.png" for m in ("all", "image", "text")]


def test_mixture_of_mamba_is_measured_against_mamba_and_moma_against_dense():
  present = ["dense", "mamba", "mom", "mom_in_proj", "moma_4t4i"]
  assert [scaling.family_baseline(a, "dense", present) for a in present[2:]] == ["mamba", "mamba", "dense"]
  assert scaling.family_baseline("mom", "dense", ["dense", "mom"]) == "dense"
