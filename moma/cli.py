"""The console of every entry point (moma.main, moma.sample, moma.evaluate, experiments/*).

Quiet by default: the libraries' log lines (absl, orbax, TFDS, jax: `I1207 12:00:00.123456 … file.py:12] …`)
are off (moma's own warnings, and any error logged, print as plain `warning: …` / `error: …` lines), and
bad input is refused in one line `error: …` on stderr with exit status 1, no traceback. Bad
input is a user error raised by the program (a ValueError or a `faults.RunError`, whose message names the
field and the fix), a flag it cannot parse, or a config file (ml_collections `--config`) that does not
exist, does not run or has no such field. `--verbosity=N` (absl's flag; argparse programs take it through
`ArgumentParser`) sets the log level as absl reads it: 0 shows INFO logs and the traceback above the error
line, -1 warnings only, 1 DEBUG.

absl programs call `run(main)` instead of `app.run(main)`; argparse programs build a `cli.ArgumentParser`
and call `run_argparse(main)`. `report` is the one-line refusal for code that runs its own main loop
(`moma.train.run`).
"""

from __future__ import annotations

import argparse
import logging as logging_lib
import os
import sys
import traceback
from typing import Any, Callable, NoReturn

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from moma import faults

USER_ERRORS = (ValueError, faults.RunError)


def verbosity_in(argv: list[str]) -> int | None:
  """`--verbosity` / `-v` as `argv` gives it, None when absent or unreadable (read on its own: a bad flag
  stops absl's parse before it may reach this one)."""
  scratch = flags.FlagValues()
  flags.DEFINE_integer("verbosity", None, "", short_name="v", flag_values=scratch)
  try:
    scratch(argv, known_only=True)
  except flags.Error:
    return None
  return scratch.verbosity


class _QuietHandler(logging_lib.Handler):
  """The one log handler of a quiet program: moma's own warnings, and anyone's errors, as plain lines
  (`warning: …`, `error: …`); the libraries' INFO and warnings are dropped."""

  def emit(self, record: logging_lib.LogRecord) -> None:
    if record.levelno >= logging_lib.ERROR or record.pathname.startswith(_PACKAGE):
      sys.stderr.write(f"{record.levelname.lower()}: {' '.join(record.getMessage().split())}\n")


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_QUIET = _QuietHandler(logging_lib.WARNING)


def set_logs(verbosity: int | None) -> None:
  """The program's log console: absl's format at absl `verbosity`, or when it is None (not given) quiet
  (`_QuietHandler`, and XLA's C++ logs below ERROR off). It is the root logger's one handler (not beside
  the one absl's first log call installs without a handler)."""
  if verbosity is None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging_lib.root.handlers = [_QUIET]
    logging_lib.root.setLevel(logging_lib.WARNING)
    logging.set_verbosity(logging.WARNING)  # the absl logger's own level, absl's handler being off the root
  else:
    logging_lib.root.handlers = [logging.get_absl_handler()]
    logging.set_verbosity(verbosity)  # with absl's handler on the root: the root logger's level


def refuse(message: str, *, tracebacks: bool) -> None:
  """Writes `message` as one stderr line `error: …`, below the traceback being handled if `tracebacks`."""
  if tracebacks and sys.exc_info()[0] is not None:
    traceback.print_exc()
  sys.stderr.write(f"error: {' '.join(message.split())}\n")


def report(fn: Callable[[], Any], *, tracebacks: bool) -> int:
  """The exit status of `fn()`: the int it returns, else 0. A user error is refused in one line (exit 1
  unless it carries its own `exit_code`); `faults.Interrupted` (the run saved and stopped) is its message."""
  try:
    status = fn()
  except faults.Interrupted as e:
    sys.stderr.write(f"{e}\n")
    return e.exit_code
  except USER_ERRORS as e:
    refuse(str(e), tracebacks=tracebacks)
    return getattr(e, "exit_code", 1)
  return status if isinstance(status, int) else 0


def _shows_tracebacks(verbosity: int | None) -> bool:
  return verbosity is not None and verbosity >= logging.INFO


def verbose() -> bool:
  """Whether an absl program's `--verbosity` (parsed) asks for INFO logs and tracebacks."""
  return flags.FLAGS["verbosity"].present and _shows_tracebacks(flags.FLAGS.verbosity)


def _flag_error(e: Exception, argv: list[str]) -> str:
  """One line for an error raised while parsing `argv`."""
  if isinstance(e, flags.IllegalFlagValueError) and e.__context__ is not None:
    # absl words it "flag --NAME=VALUE: REASON"; for a config file that raised, REASON is ml_collections'
    # formatted traceback, whose innermost error says it in one line.
    inner = e
    while inner.__context__ is not None:
      inner = inner.__context__
    return f"{str(e).partition(': ')[0]}: {inner}"
  if isinstance(e, (KeyError, AttributeError)) and e.args:  # ml_collections: an override of no such field
    detail = e.args[0]
    while isinstance(detail, Exception) and detail.args:  # AttributeError(KeyError(text)) for a leaf
      detail = detail.args[0]
    field, _, hint = str(detail).partition("\n")  # "'trian'\nDid you mean "train" instead of "trian"?"
    names = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    given = [n for n in names if field.strip("'") in n.split(".")[1:]]
    if given:
      return f"{' '.join(given)}: the config has no field {field}. {hint}".strip()
  return str(e) if isinstance(e, (flags.Error, ValueError)) else f"{type(e).__name__}: {e}"


def _check_config_files() -> None:
  """A config file that failed to load (ml_collections defers the error to the first access) fails here."""
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    try:
      getattr(flag.value, "keys", None)
    except OSError as e:
      last = str(e).strip().splitlines()[-1].strip()  # e.g. "[Errno 2] No such file or directory: 'x.py'"
      raise ValueError(f"flag --{name}={config_flags.get_config_filename(flag)}: {last}") from e


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; anything it raises (a bad flag, a config file that is missing or raises, an
  override of no field) is refused in one line, exit status 1."""
  try:
    rest = flags.FLAGS(argv)
    _check_config_files()
    return rest
  except Exception as e:  # pylint: disable=broad-except (all of it comes from the command line)
    refuse(_flag_error(e, argv), tracebacks=_shows_tracebacks(verbosity_in(argv)))
    sys.exit(1)


def run(main: Callable[[list[str]], Any]) -> NoReturn:
  """`app.run(main)` with this module's console."""

  def quiet_main(argv: list[str]) -> int:
    set_logs(flags.FLAGS.verbosity if flags.FLAGS["verbosity"].present else None)
    if len(argv) > 1:  # these programs take flags only
      refuse(f"unexpected arguments {argv[1:]}; flags are written --name=value", tracebacks=False)
      return 1
    return report(lambda: main(argv), tracebacks=verbose())

  app.run(quiet_main, flags_parser=_parse_flags)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with this module's console: a `--verbosity` argument, and a usage error (argparse's own, or a
  `parser.error` the program calls) refused in one line, exit status 1."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.add_argument("--verbosity", "-v", type=int, help="log level as absl reads it: 0 shows the libraries' "
                      "INFO logs and the traceback behind an error (default: quiet)")
    self._tracebacks = False

  def parse_known_args(self, args=None, namespace=None):
    namespace, rest = super().parse_known_args(args, namespace)
    self._tracebacks = _shows_tracebacks(namespace.verbosity)
    return namespace, rest

  def error(self, message: str) -> NoReturn:
    refuse(message, tracebacks=self._tracebacks)
    sys.exit(1)


def run_argparse(main: Callable[[], Any]) -> NoReturn:
  """Runs an argparse program's `main()` (which parses sys.argv with an `ArgumentParser`) with this module's
  console."""
  verbosity = verbosity_in(sys.argv)
  flags.FLAGS.mark_as_parsed()  # absl's own flags at their defaults, as libraries (orbax) read them
  set_logs(verbosity)
  sys.exit(report(main, tracebacks=_shows_tracebacks(verbosity)))
