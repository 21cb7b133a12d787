"""The bad-input catalogue: each case exits 1 with one line `error: …` naming the field and the fix, no
traceback, before anything is compiled, and leaves the workdir byte-identical (or absent, when it was
absent) and the current directory as it was.

`CASES` (config fields the trainer refuses) run in-process through `moma.train.run`, what the CLI calls
after flag parsing. `CLI_CASES` (flags, config files and their arguments, paths, moma.sample /
moma.evaluate, more config fields) run as programs (`python -m …` in a fresh current directory); the
default run takes those that only the CLI meets and `DEFAULT_CLI` of the others, the slow test every
case of both lists through the CLI.
"""

import ast
import contextlib
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


def _override(config, assignment):
  """Applies "a.b=value" to `config` as `--config.a.b=value` would: the value read as the field's type."""
  path, _, text = assignment.partition("=")
  *parents, leaf = path.split(".")
  node = config
  for key in parents:
    node = node[key]
  old = node[leaf]
  if isinstance(old, bool):
    value = text.lower() == "true"
  elif isinstance(old, (int, float)):
    value = type(old)(text)
  elif isinstance(old, (tuple, list)):
    value = ast.literal_eval(text)
  else:
    value = text
  node[leaf] = value


# (id, overrides of the tiny config, text the one line must hold, workdir: "new" absent, "run" an existing run)
CASES = [
    ("steps_zero", ["train.steps=0"], "config.train.steps=0 must be an integer >= 1", "run"),
    ("steps_negative", ["train.steps=-5"], "config.train.steps=-5", "run"),
    ("max_skipped_steps_zero", ["train.max_skipped_steps=0"], "config.train.max_skipped_steps=0", "run"),
    ("loss_spike_factor_below_one", ["train.loss_spike_factor=0.5"], "config.train.loss_spike_factor=0.5", "run"),
    ("loss_spike_steps_zero", ["train.loss_spike_steps=0"], "config.train.loss_spike_steps=0", "run"),
    ("freeze_matches_nothing", ["train.freeze=('nomatch*',)"], "config.train.freeze", "new"),
    ("batch_size_zero", ["train.batch_size=0"], "config.train.batch_size=0", "new"),
    ("seq_len_zero", ["train.seq_len=0"], "config.train.seq_len=0", "new"),
    ("seed_negative", ["train.seed=-1"], "config.train.seed=-1", "new"),
    ("log_every_zero", ["train.log_every=0"], "config.train.log_every=0", "run"),
    ("eval_every_negative", ["train.eval_every=-1"], "config.train.eval_every=-1", "run"),
    ("eval_steps_zero", ["train.eval_steps=0"], "config.train.eval_steps=0", "run"),
    ("warmup_negative", ["train.warmup_steps=-1"], "config.train.warmup_steps=-1", "run"),
    ("lr_zero", ["train.lr=0.0"], "config.train.lr=0.0", "run"),
    ("lr_nan", ["train.lr=nan"], "config.train.lr=nan", "run"),
    ("min_lr_ratio", ["train.min_lr_ratio=2.0"], "config.train.min_lr_ratio=2.0", "run"),
    ("b1_one", ["train.b1=1.0"], "config.train.b1=1.0", "run"),
    ("b2_negative", ["train.b2=-0.1"], "config.train.b2=-0.1", "run"),
    ("eps_zero", ["train.eps=0.0"], "config.train.eps=0.0", "run"),
    ("weight_decay_negative", ["train.weight_decay=-0.1"], "config.train.weight_decay=-0.1", "run"),
    ("grad_clip_zero", ["train.grad_clip=0.0"], "config.train.grad_clip=0.0", "run"),
    ("schedule", ["train.schedule=step"], "config.train.schedule='step'", "run"),
    ("nan_policy", ["train.nan_policy=ignore"], "config.train.nan_policy='ignore'", "run"),
    ("prefetch_negative", ["train.prefetch=-1"], "config.train.prefetch=-1", "run"),
    ("stage", ["train.stage=warmup"], "config.train.stage='warmup'", "new"),
    ("every_steps_zero", ["checkpoint.every_steps=0"], "config.checkpoint.every_steps=0", "run"),
    ("max_to_keep_zero", ["checkpoint.max_to_keep=0"], "config.checkpoint.max_to_keep=0", "run"),
    ("num_layers_zero", ["model.num_layers=0"], "config.model.num_layers=0", "new"),
    ("d_ff_zero", ["model.d_ff=0"], "config.model.d_ff=0 must be an integer >= 1", "new"),
    ("d_model_zero", ["model.d_model=0"], "config.model.d_model=0 must be an integer >= 1", "new"),
    ("max_seq_len_zero", ["model.max_seq_len=0"], "config.model.max_seq_len=0", "new"),
    ("head_dim_negative", ["model.head_dim=-4"], "config.model.head_dim=-4 must be an integer >= 0", "new"),
    ("modalities", ["model.modalities=('text', 'image')"], "config.data.modalities", "new"),
    ("patch_size", ["data.image_form=patches", "data.patch_size=5"], "data.patch_size=5 does not divide", "new"),
    ("image_form", ["data.image_form=foo"], "data.image_form='foo'", "new"),
    ("model_name", ["model.name=transformer"], "config.model.name='transformer'", "new"),
    ("num_heads", ["model.num_heads=3"], "config.model.num_heads=3 must divide", "new"),
    ("num_kv_heads", ["model.num_kv_heads=3"], "config.model.num_kv_heads=3", "new"),
    ("untie", ["model.untie=('banana',)"], "config.model.untie", "new"),
    ("dtype", ["model.dtype=float17"], "config.model.dtype='float17'", "new"),
    ("norm", ["model.norm=batch"], "config.model.norm='batch'", "new"),
    ("attention_impl", ["model.attention_impl=flash"], "config.model.attention_impl='flash'", "new"),
    ("max_seq_len", ["model.max_seq_len=64"], "config.model.max_seq_len=64", "new"),
    ("vocab_size", ["model.vocab_size=100"], "config.model.vocab_size=100", "new"),
    ("seq_len_short", ["train.seq_len=16"], "seq_len=16 is shorter", "new"),
    ("mixture_weight", ["data.mixture.text.weight=-1.0"], "data.mixture.text.weight=-1.0", "new"),
    ("mesh_devices", ["mesh.shape=(16,)"], "config.mesh.shape (16,) needs 16 devices", "run"),
    ("mesh_axes", ["mesh.shape=(1, 1)", "mesh.axes=('data', 'data')"], "config.mesh.axes ('data', 'data') repeats",
     "run"),
    ("mesh_rules", ["mesh.rules=(('foo', None),)"], "config.mesh.rules: unknown logical axis 'foo'", "run"),
    ("batch_vs_mesh", ["train.batch_size=3", "mesh.shape=(-1,)"], "change train.batch_size", "new"),
    ("upcycle_missing", ["init.upcycle_from=/nonexistent/run"], "config.init.upcycle_from", "new"),
    ("incompatible", ["model.d_model=32"], "model.d_model: workdir has 64, config has 32", "run"),
]
FIXES = ("--config.", "set ", "choose", "raise", "use ", "change", "make the", "train that", "name the",
         "revert", "expected one of", "put -1", "known: ")


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


@pytest.mark.parametrize("name,overrides,expect,kind", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_refused_before_anything_is_written(name, overrides, expect, kind, tiny_config,
                                                          tmp_path, run_dir, capsys):
  for assignment in overrides:
    _override(tiny_config, assignment)
  workdir = run_dir if kind == "run" else str(tmp_path / "new")
  line = _refused(tiny_config, workdir, capsys, expect)
  assert any(fix in line for fix in FIXES), line


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


def _main(config, *args, cache=True):
  """moma.main's argv on `config` (configs/…), the session's data cache and the case's workdir."""
  return ("moma.main", f"--config={{repo}}/configs/{config}", *(["--config.data.cache_dir={cache}"] * cache),
          "--workdir={workdir}", *args)


TINY = "mot.py:size=tiny"
# Refused while flags are parsed, or by a config file or its argument: only the CLI meets these.
# (id, argv with {repo} {cache} {tmp} {workdir}, text the one line must hold, workdir kind: see `_workdir`)
CLI_ONLY = [
    ("config_not_python", _main("../README.md", cache=False), "README.md: not a Python file", "new"),
    ("config_missing", ("moma.main", "--config=configs/mot.py", "--workdir={workdir}"),
     "flag --config=configs/mot.py: [Errno 2] No such file or directory", "new"),
    ("config_is_a_directory", _main("", cache=False), "Is a directory", "new"),
    ("config_without_get_config", ("moma.main", "--config={tmp}/configs/no_get_config.py", "--workdir={workdir}"),
     "no_get_config.py: the file defines no get_config()", "new"),
    ("config_raises", ("moma.main", "--config={tmp}/configs/raises.py", "--workdir={workdir}"),
     "raises.py: ZeroDivisionError: division by zero (line 2)", "new"),
    ("config_bad_import", ("moma.main", "--config={tmp}/configs/bad_import.py", "--workdir={workdir}"),
     "bad_import.py: ModuleNotFoundError: No module named 'no_such_module'", "new"),
    ("config_returns_none", ("moma.main", "--config={tmp}/configs/returns_none.py", "--workdir={workdir}"),
     "returns_none.py: get_config() returned None", "new"),
    ("preset_typo", _main("mot.py:tiny", cache=False), "config argument 'tiny': expected key=value", "new"),
    ("preset_unknown_key", _main("mot.py:sise=tiny", cache=False), "config argument 'sise' is unknown", "new"),
    ("preset_size", _main("mot.py:size=huge", cache=False), "config argument size='huge' is unknown", "new"),
    ("preset_modalities_repeated", _main("mot.py:modalities=text+text", cache=False),
     "config argument modalities='text+text'", "new"),
    ("preset_modalities_unknown", _main("dense.py:modalities=text+video", cache=False),
     "config argument modalities='text+video'", "new"),
    ("preset_untie_on_dense", _main("dense.py:untie=all", cache=False), "config argument 'untie' is unknown",
     "new"),
    ("preset_untie_component", _main("mot.py:untie=ffn+banana", cache=False), "unknown component 'banana'",
     "new"),
    ("preset_mom_untie", _main("mom.py:untie=qkv", cache=False), "config argument untie='qkv'", "new"),
    ("preset_mamba_size", _main("mamba.py:size=7B", cache=False), "config argument size='7B' is unknown", "new"),
    ("preset_experts_zero", _main("moma.py:experts=0t4i", cache=False), "config argument experts='0t4i'", "new"),
    ("preset_experts_letter", _main("moma.py:experts=4t4x", cache=False), "letter 'x' names no modality",
     "new"),
    ("preset_routing", _main("moma.py:routing=tc", cache=False), "config argument routing='tc'", "new"),
    ("preset_mod_not_bool", _main("moma.py:mod=maybe", cache=False), "config argument mod='maybe'", "new"),
    ("preset_transfusion_arch", _main("transfusion.py:arch=rnn", cache=False), "config argument arch='rnn'",
     "new"),
    ("preset_transfusion_objective", _main("transfusion.py:objective=gan", cache=False),
     "config.model.diffusion.objective='gan'", "new"),
    ("preset_transfusion_patch_proj", _main("transfusion.py:patch_proj=conv", cache=False),
     "config.model.patch_proj='conv'", "new"),
    ("preset_agd_size", _main("agd.py:size=huge", cache=False), "config argument size='huge'", "new"),
    ("field_typo", _main(TINY, "--config.trian.steps=3"), "--config.trian.steps: the config has no field 'trian'",
     "new"),
    ("leaf_typo", _main(TINY, "--config.train.stepz=3"), "no field 'stepz'. Did you mean", "new"),
    ("section_missing", _main(TINY, "--config.model.moe.top_k=3"), "no field 'moe'. Fields of config.model: ",
     "new"),
    ("value_not_int", _main(TINY, "--config.train.steps=1.5"), "flag --config.train.steps=1.5: expected an integer",
     "new"),
    ("value_not_float", _main(TINY, "--config.train.lr=fast"), "flag --config.train.lr=fast: expected a number",
     "new"),
    ("value_not_bool", _main(TINY, "--config.train.progress_bar=maybe"), "expected true or false", "new"),
    ("verbosity", _main(TINY, "--verbosity=loud"), "flag --verbosity=loud: expected an integer", "new"),
    ("unknown_flag", _main(TINY, "--stepz=3"), "Unknown command line flag 'stepz'; run with --helpfull", "new"),
    ("flag_typo", _main(TINY, "--workdri=x"), "Did you mean: workdir", "new"),
    ("no_config", ("moma.main", "--workdir={workdir}"), "flag --config is required", "new"),
    ("no_workdir", ("moma.main", "--config={repo}/configs/mot.py"), "flag --workdir is required", "new"),
    ("positional_argument", _main(TINY, "extra"), "unexpected arguments ['extra']", "new"),
    ("sample_no_workdir", ("moma.sample",), "flag --workdir is required", "new"),
    ("sample_num_tokens", ("moma.sample", "--workdir={workdir}", "--num_tokens=0"), "flag --num_tokens=0", "new"),
    ("sample_num_samples", ("moma.sample", "--workdir={workdir}", "--num_samples=0"), "flag --num_samples=0",
     "new"),
    ("sample_temperature", ("moma.sample", "--workdir={workdir}", "--temperature=-1"), "flag --temperature=-1",
     "new"),
    ("sample_then", ("moma.sample", "--workdir={workdir}", "--then=video"), "flag --then=video", "new"),
    ("sample_steps", ("moma.sample", "--workdir={workdir}", "--steps=0"), "flag --steps=0", "new"),
    ("sample_eta", ("moma.sample", "--workdir={workdir}", "--eta=2"), "flag --eta=2", "new"),
    ("sample_seed", ("moma.sample", "--workdir={workdir}", "--seed=x"), "flag --seed=x: expected an integer",
     "new"),
    ("evaluate_no_workdir", ("moma.evaluate",), "flag --workdir is required", "new"),
    ("evaluate_per_digit", ("moma.evaluate", "--workdir={workdir}", "--per_digit=0"), "flag --per_digit=0",
     "new"),
    ("evaluate_num_captions", ("moma.evaluate", "--workdir={workdir}", "--num_captions=0"),
     "flag --num_captions=0", "new"),
    ("evaluate_eval_batches", ("moma.evaluate", "--workdir={workdir}", "--eval_batches=0"),
     "flag --eval_batches=0", "new"),
]
# Refused by the program after flag parsing (train.run, moma.sample, moma.evaluate), as CASES are.
CLI_MORE = [
    ("workdir_under_a_file", _main(TINY), "--workdir={tmp}/file/run", "under_file"),
    ("workdir_read_only", _main(TINY), "--workdir={workdir}", "read_only"),
    ("workdir_is_a_file", _main(TINY), "is a file; name a directory", "file"),
    # An unset shell variable: nothing may be written to the current directory.
    ("workdir_empty", ("moma.main", "--config={repo}/configs/mot.py:size=tiny", "--config.data.cache_dir={cache}",
                       "--workdir="), "--workdir is empty; name the run directory", "new"),
    ("checkpoints_is_a_file", _main(TINY), "{workdir}/checkpoints is a file", "checkpoints_file"),
    ("batch_does_not_fit", _main(TINY, "--config.train.batch_size=100000"),
     "config.train.batch_size=100000 does not fit: the compiled train step needs", "new"),
    # config.json gone, checkpoints of another model: refused at restore, config.json not written.
    ("foreign_checkpoints", _main(TINY, "--config.model.d_model=32"), "checkpoints is readable", "foreign"),
    ("config_json_torn", _main(TINY), "config.json is damaged", "torn"),
    ("workdir_locked", _main(TINY), "is in use by another trainer", "locked"),
    ("data_cache_damaged", _main(TINY), "config.data.cache_dir='{tmp}/cache'", "cache"),
    ("num_kv_heads_negative", _main(TINY, "--config.model.num_kv_heads=-1"),
     "config.model.num_kv_heads=-1 must be an integer >= 0", "new"),
    ("attention_block", _main(TINY, "--config.model.attention_block=12"), "config.model.attention_block=12",
     "new"),
    ("qk_norm_kind", _main(TINY, "--config.model.qk_norm_kind=batch"), "config.model.qk_norm_kind='batch'", "new"),
    ("patch_size_zero", _main(TINY, "--config.data.patch_size=0"), "data.patch_size", "new"),
    ("moe_top_k_zero", _main("moma.py", "--config.model.moe.top_k=0"), "config.model.moe.top_k=0", "new"),
    ("moe_capacity_factor", _main("moma.py", "--config.model.moe.capacity_factor=0.0"),
     "config.model.moe.capacity_factor=0.0", "new"),
    ("moe_gate", _main("moma.py", "--config.model.moe.gate=relu"), "config.model.moe.gate='relu'", "new"),
    ("moe_routing", _main("moma.py", "--config.model.moe.routing=hash"), "config.model.moe.routing='hash'", "new"),
    ("moe_routing_rows", _main("moma.py", "--config.model.moe.routing_rows=-1"),
     "config.model.moe.routing_rows=-1", "new"),
    ("moe_layout", _main("moma.py", "--config.model.moe.layout=4t4x"), "config.model.moe.layout='4t4x'", "new"),
    ("mod_every_zero", _main("moma.py:mod=true", "--config.model.mod.every=0"), "config.model.mod.every=0", "new"),
    ("mod_capacity", _main("moma.py:mod=true", "--config.model.mod.capacity=1.5"), "config.model.mod.capacity=1.5",
     "new"),
    ("mod_selection", _main("moma.py:mod=true", "--config.model.mod.selection=row"),
     "config.model.mod.selection='row'", "new"),
    ("mamba_d_state_zero", _main("mamba.py", "--config.model.mamba.d_state=0"), "config.model.mamba.d_state=0",
     "new"),
    ("mamba_expand_zero", _main("mamba.py", "--config.model.mamba.expand=0"), "config.model.mamba.expand=0", "new"),
    ("mamba_scan_impl", _main("mamba.py", "--config.model.mamba.scan_impl=fast"),
     "config.model.mamba.scan_impl='fast'", "new"),
    ("diffusion_timesteps_zero", _main("transfusion.py", "--config.model.diffusion.timesteps=0"),
     "config.model.diffusion.timesteps=0", "new"),
    ("aux_routers_stage", _main("moma.py", "--config.train.stage=aux_routers"),
     "config.train.stage='aux_routers' needs config.model.moe.aux_router=True", "new"),
    ("agd_schedule", _main("agd.py:schedule=random"), "config.agd.schedule='random'", "new"),
    ("sample_no_run", ("moma.sample", "--workdir={workdir}"), "no config.json there", "new"),
    ("sample_no_checkpoint", ("moma.sample", "--workdir={workdir}"), "has no checkpoint under", "run"),
    ("sample_too_many_tokens", ("moma.sample", "--workdir={workdir}", "--num_tokens=100000"),
     "--num_tokens=100000: the prompt's 1 tokens and 100000 more exceed", "trained"),
    ("evaluate_no_run", ("moma.evaluate", "--workdir={workdir}"), "no config.json there", "new"),
    ("evaluate_no_checkpoint", ("moma.evaluate", "--workdir={workdir}"), "has no checkpoint under", "run"),
    ("evaluate_not_transfusion", ("moma.evaluate", "--workdir={workdir}"), "is not a Transfusion run", "trained"),
]
ALL_CLI = CLI_ONLY + CLI_MORE + [(name, _main(TINY, *(f"--config.{o}" for o in overrides)), expect, kind)
                                 for name, overrides, expect, kind in CASES]
# The default run's cases through the CLI: each program start costs 2-4 s (a config file imports jax), so
# a few of each kind that only the CLI meets (config files, their arguments, overrides, flags, the sample and
# evaluate flags) and representatives of those refused after flag parsing; the slow test runs them all.
DEFAULT_CLI = [c for c in ALL_CLI if c[0] in (
    "config_not_python", "config_missing", "config_raises", "preset_typo", "preset_modalities_repeated",
    "preset_experts_zero", "preset_routing", "preset_untie_component", "field_typo", "section_missing",
    "value_not_int", "value_not_bool", "verbosity", "unknown_flag", "no_workdir", "sample_num_tokens",
    "evaluate_per_digit", "d_ff_zero", "incompatible", "workdir_under_a_file", "workdir_read_only",
    "workdir_locked", "sample_no_checkpoint", "workdir_empty", "checkpoints_is_a_file")]
BAD_CONFIG_FILES = {
    "no_get_config.py": "x = 1\n",
    "raises.py": "def get_config(arg=None):\n  return 1 / 0\n",
    "bad_import.py": "import no_such_module\n",
    "returns_none.py": "def get_config(arg=None):\n  return None\n",
}


def _workdir(kind, tmp_path, run_dir, request):
  """The case's workdir: "new" absent, "run" a run without checkpoints (`run_dir`), "trained" the session's
  trained run, "file" a file, "under_file" a path under it, "torn" a run whose config.json is torn,
  "locked" a run another trainer holds (this process, for the call), "read_only" a path under a directory
  nobody may write, "cache" absent with a damaged data cache at tmp/cache, "checkpoints_file" a run whose
  `checkpoints` is a file, "foreign" a copy of the trained run without its config.json."""
  (tmp_path / "file").write_text("not a directory")
  if kind == "checkpoints_file":
    with open(os.path.join(run_dir, "checkpoints"), "w") as f:
      f.write("not a directory")
  if kind == "foreign":
    foreign = tmp_path / "foreign"
    shutil.copytree(request.getfixturevalue("tiny_run"), foreign)
    os.remove(foreign / "config.json")
    return str(foreign)
  if kind in ("run", "torn", "locked", "checkpoints_file"):
    if kind == "torn":
      with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write('{"model": {"d_model": 6')
    return run_dir
  if kind == "trained":
    return request.getfixturevalue("tiny_run")
  if kind == "file":
    return str(tmp_path / "file")
  if kind == "under_file":
    return str(tmp_path / "file" / "run")
  if kind == "read_only":
    if os.geteuid() == 0:  # root writes through any mode bits; sysfs refuses even root a new directory
      try:
        os.makedirs("/sys/moma_bad_input/run")
      except OSError:
        return "/sys/moma_bad_input/run"
      pytest.skip("/sys takes new directories here: no read-only path for root")
    locked = tmp_path / "read_only"
    locked.mkdir(mode=0o555)
    return str(locked / "run")
  if kind == "cache":
    cache = tmp_path / "cache"
    shutil.copytree(request.getfixturevalue("data_cache_dir"), cache)
    for root, _, files in os.walk(cache):
      for name in files:
        if "train.array_record" in name:
          with open(os.path.join(root, name), "r+b") as f:
            f.truncate(1000)
  return str(tmp_path / "new")


def _refused_by_the_program(case, tmp_path, run_dir, data_cache_dir, request):
  """Runs the case's program in a fresh current directory and checks: exit status 1, one stderr line
  `error: …` holding the expected text, no traceback, the workdir and the current directory unchanged."""
  name, argv, expect, kind = case
  workdir = _workdir(kind, tmp_path, run_dir, request)
  configs = tmp_path / "configs"
  configs.mkdir()
  for file_name, text in BAD_CONFIG_FILES.items():
    (configs / file_name).write_text(text)
  cache = str(tmp_path / "cache") if kind == "cache" else data_cache_dir
  fill = lambda text: text.format(repo=REPO, cache=cache, tmp=tmp_path, workdir=workdir)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  before = _snapshot(workdir)
  # One device, as a user has (a mesh that leaves devices idle warns), two where the case needs a mesh.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if name == "batch_vs_mesh":
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  module, *args = argv
  with faults.WorkdirLock(workdir) if kind == "locked" else contextlib.nullcontext():
    result = subprocess.run([sys.executable, "-m", module, *map(fill, args)], cwd=cwd, capture_output=True,
                            text=True, env={**env, "PYTHONPATH": REPO}, timeout=300)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1 and len(lines) == 1, (name, result.returncode, result.stderr)
  assert lines[0].startswith("error: ") and fill(expect) in lines[0], (name, lines[0])
  assert "Traceback" not in result.stderr + result.stdout
  assert _snapshot(workdir) == before and _snapshot(str(cwd)) == {}, name


@pytest.mark.parametrize("case", DEFAULT_CLI, ids=[c[0] for c in DEFAULT_CLI])
def test_the_programs_refuse_bad_input_in_one_line(case, tmp_path, run_dir, data_cache_dir, request):
  _refused_by_the_program(case, tmp_path, run_dir, data_cache_dir, request)


@pytest.mark.slow
@pytest.mark.parametrize("case", ALL_CLI, ids=[c[0] for c in ALL_CLI])
def test_every_case_is_refused_in_one_line_through_the_cli(case, tmp_path, run_dir, data_cache_dir, request):
  _refused_by_the_program(case, tmp_path, run_dir, data_cache_dir, request)


def test_the_catalogue_holds_70_cases_through_the_cli():
  names = [c[0] for c in ALL_CLI]
  assert len(set(names)) == len(names) >= 70
