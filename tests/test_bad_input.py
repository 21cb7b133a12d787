"""The bad-input catalogue: each case exits non-zero with one line naming the field and the fix, before
anything is compiled, and leaves the workdir byte-identical (or absent, when it was absent).

Cases run in-process through `moma.train.run` (what the CLI calls after flag parsing); the few that only
the CLI can meet (flag values, the config argument) run as subprocesses.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from moma import checkpoint
from moma import faults
from moma import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set(path, value):
  def mutate(config):
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
      node = node[key]
    node[leaf] = value
  return mutate


# (id, change to the tiny config, text the one line must hold, workdir: "new" absent, "run" an existing run)
CASES = [
    ("steps_zero", _set("train.steps", 0), "config.train.steps=0 must be an integer >= 1", "run"),
    ("steps_negative", _set("train.steps", -5), "config.train.steps=-5", "run"),
    ("batch_size_zero", _set("train.batch_size", 0), "config.train.batch_size=0", "new"),
    ("seq_len_zero", _set("train.seq_len", 0), "config.train.seq_len=0", "new"),
    ("seed_negative", _set("train.seed", -1), "config.train.seed=-1", "new"),
    ("log_every_zero", _set("train.log_every", 0), "config.train.log_every=0", "run"),
    ("eval_every_negative", _set("train.eval_every", -1), "config.train.eval_every=-1", "run"),
    ("eval_steps_zero", _set("train.eval_steps", 0), "config.train.eval_steps=0", "run"),
    ("warmup_negative", _set("train.warmup_steps", -1), "config.train.warmup_steps=-1", "run"),
    ("lr_zero", _set("train.lr", 0.0), "config.train.lr=0.0", "run"),
    ("lr_nan", _set("train.lr", float("nan")), "config.train.lr=nan", "run"),
    ("min_lr_ratio", _set("train.min_lr_ratio", 2.0), "config.train.min_lr_ratio=2.0", "run"),
    ("b1_one", _set("train.b1", 1.0), "config.train.b1=1.0", "run"),
    ("b2_negative", _set("train.b2", -0.1), "config.train.b2=-0.1", "run"),
    ("eps_zero", _set("train.eps", 0.0), "config.train.eps=0.0", "run"),
    ("weight_decay_negative", _set("train.weight_decay", -0.1), "config.train.weight_decay=-0.1", "run"),
    ("grad_clip_zero", _set("train.grad_clip", 0.0), "config.train.grad_clip=0.0", "run"),
    ("schedule", _set("train.schedule", "step"), "config.train.schedule='step'", "run"),
    ("nan_policy", _set("train.nan_policy", "ignore"), "config.train.nan_policy='ignore'", "run"),
    ("prefetch_negative", _set("train.prefetch", -1), "config.train.prefetch=-1", "run"),
    ("stage", _set("train.stage", "warmup"), "config.train.stage='warmup'", "new"),
    ("every_steps_zero", _set("checkpoint.every_steps", 0), "config.checkpoint.every_steps=0", "run"),
    ("max_to_keep_zero", _set("checkpoint.max_to_keep", 0), "config.checkpoint.max_to_keep=0", "run"),
    ("num_layers_zero", _set("model.num_layers", 0), "config.model.num_layers=0", "new"),
    ("modalities", _set("model.modalities", ("text", "image")), "config.data.modalities", "new"),
    ("patch_size", lambda c: (_set("data.image_form", "patches")(c), _set("data.patch_size", 5)(c)),
     "data.patch_size=5 does not divide", "new"),
    ("model_name", _set("model.name", "transformer"), "config.model.name='transformer'", "new"),
    ("num_heads", _set("model.num_heads", 3), "config.model.num_heads=3 must divide", "new"),
    ("num_kv_heads", _set("model.num_kv_heads", 3), "config.model.num_kv_heads=3", "new"),
    ("untie", _set("model.untie", ("banana",)), "config.model.untie", "new"),
    ("dtype", _set("model.dtype", "float17"), "config.model.dtype='float17'", "new"),
    ("max_seq_len", _set("model.max_seq_len", 64), "config.model.max_seq_len=64", "new"),
    ("vocab_size", _set("model.vocab_size", 100), "config.model.vocab_size=100", "new"),
    ("seq_len_short", _set("train.seq_len", 16), "seq_len=16 is shorter", "new"),
    ("mixture_weight", _set("data.mixture.text.weight", -1.0), "data.mixture.text.weight=-1.0", "new"),
    ("mesh_devices", _set("mesh.shape", (16,)), "config.mesh.shape (16,) needs 16 devices", "run"),
    ("mesh_axes", lambda c: c.mesh.update(shape=(1, 1), axes=("data", "data")),
     "config.mesh.axes ('data', 'data') repeats", "run"),
    ("batch_vs_mesh", lambda c: (c.train.update(batch_size=3), c.mesh.update(shape=(2,))),
     "change train.batch_size", "new"),
    ("upcycle_missing", _set("init.upcycle_from", "/nonexistent/run"), "config.init.upcycle_from", "new"),
    ("incompatible", _set("model.d_model", 32), "model.d_model: workdir has 64, config has 32", "run"),
]


def _snapshot(path):
  """{relative path: bytes} of every file under `path`, or None when it does not exist."""
  if not os.path.exists(path):
    return None
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


@pytest.fixture
def run_dir(tiny_config, tmp_path):
  """A workdir as a finished run leaves it (config.json, metrics.jsonl), without training."""
  path = tmp_path / "run"
  path.mkdir()
  checkpoint.write_config(train.resolve_config(tiny_config), str(path))
  (path / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 5.0}) + "\n")
  return str(path)


def _refused(config, workdir, capsys, expect):
  """Runs train.run and checks: non-zero exit, one stderr line holding `expect`, workdir unchanged."""
  before = _snapshot(workdir)
  rc = train.run(config, workdir)
  lines = capsys.readouterr().err.strip().splitlines()
  assert rc != 0
  assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
  assert _snapshot(workdir) == before
  return lines[0]


@pytest.mark.parametrize("name,mutate,expect,kind", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_refused_before_anything_is_written(name, mutate, expect, kind, tiny_config,
                                                          tmp_path, run_dir, capsys):
  mutate(tiny_config)
  workdir = run_dir if kind == "run" else str(tmp_path / "new")
  line = _refused(tiny_config, workdir, capsys, expect)
  fixes = ("--config.", "set ", "choose", "raise", "use ", "change", "make the", "train that", "name the",
           "revert", "expected one of")
  assert any(fix in line for fix in fixes), line


def test_bad_workdirs_are_refused_and_left_as_they_were(tiny_config, tmp_path, run_dir, capsys):
  a_file = tmp_path / "file"
  a_file.write_text("not a directory")
  _refused(tiny_config, str(a_file), capsys, "is a file; name a directory")

  with open(os.path.join(run_dir, "config.json"), "w") as f:
    f.write('{"model": {"d_model": 6')  # Torn.
  line = _refused(tiny_config, run_dir, capsys, f"{run_dir}/config.json is damaged")
  assert "delete it" in line


def test_a_held_lock_refuses_a_second_trainer_naming_the_holder(tiny_config, run_dir, capsys):
  with faults.WorkdirLock(run_dir):
    line = _refused(tiny_config, run_dir, capsys, f"is in use by another trainer (pid {os.getpid()} on host")
  assert "use another --workdir" in line and not os.path.exists(os.path.join(run_dir, "lock"))


def test_a_damaged_data_cache_names_the_cache_and_the_fix(tiny_config, tmp_path, capsys):
  cache = tmp_path / "cache"
  shutil.copytree(tiny_config.data.cache_dir, cache)
  for root, _, files in os.walk(cache):
    for name in files:
      if "train.array_record" in name:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(1000)
  tiny_config.data.cache_dir = str(cache)
  line = _refused(tiny_config, str(tmp_path / "new"), capsys, f"config.data.cache_dir='{cache}'")
  assert f"delete {cache}" in line


def _cli(*args, workdir):
  return subprocess.run([sys.executable, "-m", "moma.main", "--config=configs/mot.py:size=tiny",
                         f"--workdir={workdir}", *args], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": REPO}, timeout=300)


@pytest.mark.parametrize("args,expect", [
    (("--config.train.steps=0",), "error: config.train.steps=0 must be an integer >= 1; set e.g."),
    (("--verbosity=loud",), "--verbosity=loud"),
])
def test_cli_errors_are_one_line_without_traceback(args, expect, tmp_path):
  result = _cli(*args, workdir=tmp_path / "new")
  assert result.returncode != 0
  lines = [l for l in result.stderr.splitlines() if l.strip() and not l.startswith("Pass --help")]
  assert len(lines) == 1 and expect in lines[0], result.stderr
  assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "new")
