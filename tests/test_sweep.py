"""Sweep expansion, the declared studies, skip-finished logic and the runner (with a fake trainer)."""

import csv
import json
import pathlib
import shlex
import subprocess

import pytest

from configs import common
from configs import sweeps
from configs.sweeps import scaling
from experiments import sweep
from moma import studies

CONFIGS = {"dense", "mot", "moma", "mamba", "mom", "transfusion"}


def fake_run(run_dir, steps_done, steps=10):
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "config.json").write_text(json.dumps({"train": {"steps": steps}}))
  records = [{"step": s, "loss": 5.0 - 0.1 * s} for s in range(1, steps_done + 1)]
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_product_and_zip():
  configs = sweeps.axis("config", ["configs/dense.py", "configs/mot.py"])
  seeds = sweeps.axis("train.seed", [0, 1, 2])
  runs = sweeps.product(configs, seeds)
  assert len(runs) == 6 and runs[1] == {"config": "configs/dense.py", "train.seed": 1}
  zipped = sweeps.zip_(sweeps.axis("model.d_model", [64, 128]), sweeps.axis("model.num_heads", [2, 4]))
  assert zipped == [{"model.d_model": 64, "model.num_heads": 2}, {"model.d_model": 128, "model.num_heads": 4}]
  with pytest.raises(ValueError, match="lengths"):
    sweeps.zip_(configs, seeds)
  with pytest.raises(ValueError, match="train.seed"):
    sweeps.product(seeds, seeds)


def test_run_names():
  assert sweeps.run_name({"config": "configs/mot.py:size=tiny", "name": "mot"}) == "mot"
  derived = sweeps.run_name({"config": "configs/mot.py:size=tiny", "model.untie": ("ffn", "o"), "x": "a/b"})
  assert derived == "mot,size=tiny,model.untie=ffn+o,x=a_b"
  with pytest.raises(ValueError, match="'config'"):
    sweeps.run_name({"train.seed": 0})


SIZED_SWEEPS = [n for n in sweeps.known() if n != "scaling"]  # scaling declares its own sizes


@pytest.mark.parametrize("name", SIZED_SWEEPS)
def test_declared_sweeps_load(name):
  loaded, runs, baseline = sweeps.load(name + ":size=S")
  assert loaded == name and runs and baseline in [sweeps.run_name(r) for r in runs]
  for run in runs:
    path, _, arg = run["config"].partition(":")
    assert pathlib.Path(path).parent.name == "configs" and pathlib.Path(path).stem in CONFIGS
    assert "size=S" in arg


def test_the_scaling_ladder_follows_its_rule():
  runs = {sweeps.run_name(r): r for r in sweeps.load("scaling")[1]}
  for size in ("tiny", "small", "medium", "large"):
    for arch in ("dense", "mot"):
      run = runs[f"{arch}_{size}/seed=0"]
      tokens = run["train.steps"] * run["train.batch_size"] * 256
      assert tokens == pytest.approx(2 * common.non_embedding_params(size), rel=0.01)
      assert run["train.lr"] == pytest.approx(2e-3 * 96 / common.SIZES[size]["d_model"])
  assert {f"{a}_{s}/seed=1" for a in ("dense", "mot") for s in ("tiny", "small")} <= set(runs)
  assert {f"{a}_{s}/seed=0" for a in ("moma_4t4i", "mamba", "mom") for s in common.LADDER} <= set(runs)
  assert {f"{a}_medium/seed=1" for a in scaling.CONFIGS} <= set(runs)
  assert runs["mamba_medium/seed=0"]["config"].startswith("configs/mamba.py:size=medium")


def test_the_issue_studies_are_declared():
  assert {"architectures", "mot_untie", "mom_untie"} <= set(sweeps.known())
  arch = [sweeps.run_name(r) for r in sweeps.load("architectures")[1]]
  assert arch == ["dense", "mot", "moma_4t4i", "moe_8shared", "mamba", "mom"]
  mot = [r["config"] for r in sweeps.load("mot_untie")[1]]
  assert [c.split("untie=")[-1] for c in mot[1:]] == ["ffn", "ffn+qkv", "ffn+qkv+o", "ffn+qkv+o+norm"]


def test_unknown_sweep_name_lists_known(capsys):
  with pytest.raises(ValueError, match="unknown sweep 'nope'.*mot_untie"):
    sweeps.load("nope")
  with pytest.raises(SystemExit):
    sweep.main(["nope", "--root", "runs"])
  assert "known sweeps: architectures" in capsys.readouterr().err
  with pytest.raises(ValueError, match="k=v"):
    sweeps.load("mot_untie:tiny")
  with pytest.raises(ValueError, match=r"takes arguments \['size', 'seeds'\], not \['steps'\]"):
    sweeps.load("mot_untie:steps=5")


def test_is_finished(tmp_path):
  assert not studies.is_finished(tmp_path / "absent")
  fake_run(tmp_path / "partial", steps_done=6)
  fake_run(tmp_path / "done", steps_done=10)
  assert not studies.is_finished(tmp_path / "partial")
  assert studies.is_finished(tmp_path / "done")
  assert studies.is_finished(tmp_path / "partial", steps=5)  # e.g. --set train.steps=5
  assert not studies.is_finished(tmp_path / "done", steps=20)
  with open(tmp_path / "done" / "metrics.jsonl", "a") as f:
    f.write('{"step": 11, "lo')  # killed mid-write: ignored
  assert studies.is_finished(tmp_path / "done")


def test_print_commands(capsys, tmp_path):
  assert sweep.main(["mot_untie:size=S", "--root", str(tmp_path), "--print-commands",
                     "--set", "train.steps=50", "--only", "dense,mot_ffn_q*"]) == 0
  commands = [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]
  directory = tmp_path / "mot_untie,size=S,train.steps=50"
  expected = {"dense": "configs/dense.py:size=S", "mot_ffn_qkv": "configs/mot.py:size=S,untie=ffn+qkv",
              "mot_ffn_qkv_o": "configs/mot.py:size=S,untie=ffn+qkv+o",
              "mot_ffn_qkv_o_norm": "configs/mot.py:size=S,untie=ffn+qkv+o+norm"}
  assert commands == [["python", "-m", "moma.main", f"--config={config}", f"--workdir={directory / name}",
                       "--config.train.steps=50"] for name, config in expected.items()]
  assert sweep.format_value(("ffn", "qkv")) == "('ffn', 'qkv')"
  with pytest.raises(ValueError, match="matches no run"):
    sweep.select(sweeps.load("mot_untie")[1], "mamba*")


def test_runner_skips_finished_runs_and_gathers(tmp_path, monkeypatch, capsys):
  directory = tmp_path / "mom_untie"
  fake_run(directory / "mamba", steps_done=10)  # finished: skipped
  fake_run(directory / "mom_x_proj", steps_done=4)  # partial: resumed
  launched = []

  def fake_trainer(argv, check):
    workdir = pathlib.Path(next(a for a in argv if a.startswith("--workdir=")).split("=", 1)[1])
    launched.append(workdir.name)
    if workdir.name == "mom_out_proj":
      return subprocess.CompletedProcess(argv, 1)
    fake_run(workdir, steps_done=10)
    return subprocess.CompletedProcess(argv, 0)

  monkeypatch.setattr(sweep.subprocess, "run", fake_trainer)
  assert sweep.main(["mom_untie", "--root", str(tmp_path)]) == 1  # one run failed
  assert launched == ["mom_in_proj", "mom_x_proj", "mom_dt_proj", "mom_out_proj", "mom_all"]
  rows = {r["run"]: r for r in csv.DictReader(open(directory / "results.csv"))}
  assert {n: r["status"] for n, r in rows.items()} == {
      "mamba": "finished", "mom_in_proj": "finished", "mom_x_proj": "finished", "mom_dt_proj": "finished",
      "mom_out_proj": "failed", "mom_all": "finished"}
  assert float(rows["mom_all"]["loss"]) == pytest.approx(4.0)
  assert "| mamba |" in (directory / "results.md").read_text()
  assert "experiments.flops_matched" in capsys.readouterr().out

  launched.clear()
  assert sweep.main(["mom_untie", "--root", str(tmp_path), "--only", "mom_all,mamba"]) == 0
  assert launched == []  # everything chosen is finished
  assert sweep.main(["mom_untie", "--root", str(tmp_path), "--gather-only"]) == 0
  assert launched == []


def test_seeds_repeat_every_run_seed_outermost(capsys, tmp_path):
  _, runs, baseline = sweeps.load("architectures:size=small,seeds=3")
  names = [sweeps.run_name(r) for r in runs]
  archs = ["dense", "mot", "moma_4t4i", "moe_8shared", "mamba", "mom"]
  assert names == [f"{a}/seed={s}" for s in range(3) for a in archs]  # one seed of each arch first
  assert [r["train.seed"] for r in runs] == [s for s in range(3) for _ in archs]
  assert all("size=small" in r["config"] for r in runs) and baseline == "dense"
  assert sweep.main(["mot_untie:size=small,seeds=1", "--root", str(tmp_path), "--print-commands",
                     "--only", "dense/*"]) == 0
  (line,) = capsys.readouterr().out.strip().splitlines()
  workdir = tmp_path / "mot_untie,size=small,seeds=1" / "dense" / "seed=0"
  assert shlex.split(line)[3:] == [f"--config=configs/dense.py:size=small", f"--workdir={workdir}",
                                   "--config.train.seed=0"]
  for bad in ("seeds=0", "seeds=two"):
    with pytest.raises(ValueError, match="seeds="):
      sweeps.load(f"mom_untie:{bad}")
  with pytest.raises(ValueError, match="set it already"):
    sweeps.seeded([{"config": "configs/dense.py", "train.seed": 4}], 2)
  assert sweeps.run_name({"config": "c", "name": "../x/./seed=1"}) == "__/x/_/seed=1"


def test_studies_status_lists_finished_running_partial_and_missing(tmp_path, capsys):
  import os  # pylint: disable=g-import-not-at-top
  from experiments import studies_status  # pylint: disable=g-import-not-at-top
  directory = tmp_path / "mom_untie,size=small,seeds=2"
  fake_run(directory / "mamba" / "seed=0", steps_done=10)
  fake_run(directory / "mom_in_proj" / "seed=0", steps_done=4)
  fake_run(directory / "mom_x_proj" / "seed=0", steps_done=6)
  for run in ("mamba/seed=0", "mom_in_proj/seed=0", "mom_x_proj/seed=0"):
    (directory / run / "config.json").write_text(json.dumps({"train": {"steps": 10, "batch_size": 4,
                                                                       "seq_len": 32}}))
  for run in ("mamba/seed=0", "mom_in_proj/seed=0"):
    with open(directory / run / "metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": 0, "tokens_per_s": 50.0}) + "\n" + json.dumps({"step": 0, "tokens_per_s": 640.0})
              + "\n")
  (directory / "mom_in_proj" / "seed=0" / "lock").write_text(json.dumps(
      {"pid": os.getpid(), "host": os.uname().nodename}))
  (directory / "mom_x_proj" / "seed=0" / "lock").write_text(json.dumps({"pid": 2**22 + 1, "host": "gone"}))
  assert studies_status.main(["mom_untie:size=small,seeds=2", "--root", str(tmp_path)]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["studies"][0]
  rows = {r["run"]: r for r in report["runs"]}
  assert [rows[n]["status"] for n in ("mamba/seed=0", "mom_in_proj/seed=0", "mom_x_proj/seed=0",
                                      "mom_all/seed=1")] == ["finished", "running", "partial", "missing"]
  assert (report["finished"], report["total"]) == (1, 12)
  # 6 steps left × 32 × 4 tokens (fake_run's config) at the median 640 tokens/s past the first log = 0.02 min
  assert rows["mom_in_proj/seed=0"]["minutes_left"] == pytest.approx(6 * 4 * 32 / 640 / 60)
  assert rows["mom_in_proj/seed=1"]["minutes_left"] == pytest.approx(2500 * 16 * 256 / 640 / 60)  # same run's pace
  assert rows["mom_all/seed=1"]["minutes_left"] is None and report["unpaced"] == 8  # x, dt, out, all × 2 seeds
