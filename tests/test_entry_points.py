"""Every entry point, run as a program: no library log line by default, bad input refused in one line
`error: …` (exit status 1, no traceback), and `--verbosity=0` brings the traceback back (moma/cli.py).

Each case is one subprocess (~3 s of imports), on the session's trained `tiny_run`."""

import logging
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from moma import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_LINE = re.compile(r"^[IWEF][0-9]{4} ", re.MULTILINE)


def program(module, *args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user has
  result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**env, "PYTHONPATH": REPO}, timeout=300)
  assert not LOG_LINE.search(result.stdout + result.stderr) or "--verbosity=0" in args, result.stderr
  return result


@pytest.fixture
def run_copy(tiny_run, tmp_path):
  """A copy of the trained run, for programs that write into their workdir."""
  return shutil.copytree(tiny_run, tmp_path / "run")


def test_sample_prints_its_samples_and_no_log_line(tiny_run):
  result = program("moma.sample", f"--workdir={tiny_run}", "--prompt=The ", "--num_tokens=4")
  assert result.returncode == 0 and result.stdout.count("--- sample") == 2, result.stderr
  assert not result.stderr


def test_trainer_on_a_finished_run_restores_it_quietly(run_copy, data_cache_dir):
  result = program("moma.main", "--config=configs/mot.py:size=tiny", f"--workdir={run_copy}",
                   f"--config.data.cache_dir={data_cache_dir}", "--config.train.steps=2",
                   "--config.train.eval_every=2", "--config.train.eval_steps=2")
  assert result.returncode == 0 and "is already trained to step 2" in result.stdout, result.stderr
  assert not result.stderr


def test_an_argparse_experiment_reads_a_checkpoint_quietly(tiny_run):
  result = program("experiments.eval_sources", tiny_run, "--eval_steps=1")
  assert result.returncode == 0 and result.stdout.startswith("| run | source"), result.stderr
  assert not result.stderr


def _workdir(tmp_path, tiny_run, kind):
  """A directory with no run, or a run's config.json without its checkpoints."""
  path = tmp_path / kind
  path.mkdir()
  if kind == "no_checkpoint":
    shutil.copy(os.path.join(tiny_run, "config.json"), path)
  return path


BAD_INPUT = {
    "sample, no run": (("moma.sample", "--workdir={no_run}"), "no config.json there"),
    "sample, no checkpoint": (("moma.sample", "--workdir={no_checkpoint}"), "has no checkpoint under"),
    "evaluate, not Transfusion": (("moma.evaluate", "--workdir={tiny_run}"), "is not a Transfusion run"),
    "main, config not Python": (("moma.main", "--config=README.md", "--workdir={no_run}"),
                                "flag --config=README.md: not a Python file"),
    "main, workdir under a file": (("moma.main", "--config=configs/mot.py:size=tiny", "--workdir={a_file}/run"),
                                   "--workdir={a_file}/run"),
    "main, unknown field": (("moma.main", "--config=configs/mot.py:size=tiny", "--config.trian.steps=3",
                             "--workdir={no_run}"), "--config.trian.steps: the config has no field 'trian'"),
    "flops_matched, no run": (("experiments.flops_matched", "{no_run}", "{tiny_run}"),
                              "holds neither config.json nor seed=K run directories"),
}
# --verbosity=0 on one program of each kind: absl, absl's flag parsing (a field, a config file), argparse, and
# an OSError (cli.report's path line). Quiet, the tests/test_bad_input.py catalogue runs the main cases.
VERBOSE = ("sample, no checkpoint", "main, unknown field", "main, config not Python", "main, workdir under a file",
           "flops_matched, no run")
QUIET = [c for c in BAD_INPUT if not c.startswith("main, ")]


@pytest.mark.parametrize("case,verbose", [(c, False) for c in QUIET] + [(c, True) for c in VERBOSE])
def test_bad_input_is_one_line_and_verbosity_0_adds_the_traceback(case, verbose, tiny_run, tmp_path):
  (module, *args), expect = BAD_INPUT[case]
  paths = dict(tiny_run=tiny_run, **{k: _workdir(tmp_path, tiny_run, k) for k in ("no_run", "no_checkpoint")})
  paths["a_file"] = tmp_path / "a_file"
  paths["a_file"].write_text("not a directory")
  result = program(module, *(a.format(**paths) for a in args), *(["--verbosity=0"] if verbose else []))
  lines = result.stderr.strip().splitlines()
  expect = expect.format(**paths)
  assert result.returncode == 1 and lines[-1].startswith("error: ") and expect in lines[-1], result.stderr
  if verbose:
    assert "Traceback (most recent call last)" in result.stderr
  else:
    assert len(lines) == 1 and not result.stdout, result.stderr
  assert not os.listdir(paths["no_run"])  # nothing written


def test_quiet_console_keeps_moma_warnings_and_errors_as_plain_lines(capsys):
  """moma's warnings and errors print as plain lines; the libraries' records do not, errors included (orbax
  logs each failed save thread before the program says it in one line)."""
  logger = logging.getLogger("test_entry_points")
  logger.propagate, logger.handlers = False, [cli._QUIET]  # pylint: disable=protected-access
  record = lambda level, path: logging.LogRecord("absl", level, path, 1, "a  %s\nwarning", ("plain",), None)
  moma = lambda name: os.path.join(REPO, "moma", name)
  try:
    for level, path in ((logging.WARNING, moma("loop.py")), (logging.ERROR, "orbax/x.py"),
                        (logging.WARNING, "orbax/x.py"), (logging.INFO, moma("steps.py")),
                        (logging.ERROR, moma("checkpoint.py"))):
      logger.handle(record(level, path))
  finally:
    logger.handlers = []
  assert capsys.readouterr().err == "warning: a plain warning\nerror: a plain warning\n"


class _RaisesWhenCollected:
  def __init__(self, error):
    self.error = error

  def __del__(self):
    raise self.error


def test_quiet_console_drops_what_python_ignores_and_thread_noise_at_exit(capsys, monkeypatch):
  """orbax's teardown ("Event loop is closed", raised in callbacks Python ignores) prints nothing in quiet
  mode; a KeyboardInterrupt Python ignores, and a thread's error while the program runs, still print."""
  monkeypatch.setattr(sys, "unraisablehook", cli._quiet_unraisable)  # pylint: disable=protected-access
  _RaisesWhenCollected(RuntimeError("Event loop is closed"))
  assert capsys.readouterr().err == ""
  _RaisesWhenCollected(KeyboardInterrupt())
  assert "KeyboardInterrupt" in capsys.readouterr().err

  def thread_raising(error):
    def fail():
      raise error
    thread = threading.Thread(target=fail)
    thread.start()
    thread.join()

  monkeypatch.setattr(threading, "excepthook", cli._quiet_thread_exception)  # pylint: disable=protected-access
  thread_raising(RuntimeError("Event loop is closed"))
  assert capsys.readouterr().err == ""
  thread_raising(OSError("a real failure"))
  assert "OSError: a real failure" in capsys.readouterr().err
