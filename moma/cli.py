"""The console of every entry point (moma.main, moma.sample, moma.evaluate, experiments/*).

Quiet by default: the libraries' log lines (absl, orbax, TFDS, jax: `I1207 12:00:00.123456 … file.py:12] …`)
are off, their errors included (moma's own warnings and errors print as plain `warning: …` / `error: …`
lines), and so are the exceptions Python ignores (in a finalizer or callback: orbax's asyncio teardown,
"Event loop is closed") and those of threads still running at exit. Bad input is refused in one line
`error: …` on stderr with exit status 1, no traceback. Bad input is a user error raised by the program (a
ValueError or a `faults.RunError`, whose message names the field and the fix), an OSError a user causes (a
path that is read-only, on a full disk, under a file: the line names the path), a flag it cannot parse, or
a config file (ml_collections `--config`) that does not exist, does not run or has no such field.
`--verbosity=N` (absl's flag; argparse programs take it through `ArgumentParser`) sets the log level as
absl reads it: 0 shows INFO logs, the libraries' errors and the traceback above the error line, -1
warnings only, 1 DEBUG.

absl programs call `run(main)` instead of `app.run(main)`; argparse programs build a `cli.ArgumentParser`
and call `run_argparse(main)`. `report` is the one-line refusal for code that runs its own main loop
(`moma.train.run`).
"""

from __future__ import annotations

import argparse
import errno
import logging as logging_lib
import os
import re
import sys
import threading
import traceback
from typing import Any, Callable, NoReturn

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_lib  # its file parser

from moma import faults

USER_ERRORS = (ValueError, faults.RunError)
# OSErrors a user causes, each with its fix (the line names the path: `_os_error`).
_PATH_FIXES = {
    errno.EACCES: "make it writable or choose another path",
    errno.EPERM: "make it writable or choose another path",
    errno.EROFS: "choose a path on a writable file system",
    errno.ENOSPC: "free space there or choose a path on another disk",
    errno.EDQUOT: "free space there or choose a path on another disk",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "it is a directory: name a file",
    errno.ENAMETOOLONG: "choose a shorter path",
}


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
  """The one log handler of a quiet program: moma's own warnings and errors as plain lines (`warning: …`,
  `error: …`); the libraries' records are dropped, their errors too (orbax logs each failure of its save
  threads, which the program then reports in its own one line)."""

  def emit(self, record: logging_lib.LogRecord) -> None:
    if record.pathname.startswith(_PACKAGE):
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
    sys.unraisablehook, threading.excepthook = _quiet_unraisable, _quiet_thread_exception
  else:
    logging_lib.root.handlers = [logging.get_absl_handler()]
    logging.set_verbosity(verbosity)  # with absl's handler on the root: the root logger's level
    sys.unraisablehook, threading.excepthook = sys.__unraisablehook__, threading.__excepthook__


def _quiet_unraisable(unraisable) -> None:
  """An exception Python ignores (raised in a finalizer or a callback: orbax's asyncio loop closing under
  its tensorstore callbacks at exit) is not shown; a KeyboardInterrupt or SystemExit still is."""
  if not issubclass(unraisable.exc_type, Exception):
    sys.__unraisablehook__(unraisable)


def _quiet_thread_exception(args) -> None:
  """A library thread's exception at exit (the interpreter finalizing, or asyncio's closed loop) is not
  shown; one while the program runs still is."""
  closed_loop = isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed"
  if not (sys.is_finalizing() or closed_loop):
    threading.__excepthook__(args)


def refuse(message: str, *, tracebacks: bool) -> None:
  """Writes `message` as one stderr line `error: …`, below the traceback being handled if `tracebacks`."""
  if tracebacks and sys.exc_info()[0] is not None:
    traceback.print_exc()
  sys.stderr.write(f"error: {' '.join(message.split())}\n")


def report(fn: Callable[[], Any], *, tracebacks: bool) -> int:
  """The exit status of `fn()`: the int it returns, else 0. A user error is refused in one line (exit 1
  unless it carries its own `exit_code`), as is an OSError a user causes (`_PATH_FIXES`);
  `faults.Interrupted` (the run saved and stopped) is its message."""
  try:
    status = fn()
  except faults.Interrupted as e:
    sys.stderr.write(f"{e}\n")
    return e.exit_code
  except USER_ERRORS as e:
    refuse(str(e), tracebacks=tracebacks)
    return getattr(e, "exit_code", 1)
  except OSError as e:
    if e.errno not in _PATH_FIXES:
      raise
    refuse(_os_error(e, sys.argv), tracebacks=tracebacks)
    return 1
  return status if isinstance(status, int) else 0


def _os_error(e: OSError, argv: list[str]) -> str:
  """One line for an OSError of `_PATH_FIXES`: the path (and the flag of `argv` that holds it), what went
  wrong and the fix."""
  path = os.fspath(e.filename) if e.filename is not None else ""
  where = path
  for arg in argv:  # the flag naming that path, a directory above it or one it would create
    name, _, value = arg.partition("=")
    if path and name.startswith("--") and value and (_within(path, value) or _within(value, path)):
      where = arg if os.path.abspath(value) == os.path.abspath(path) else f"{arg} ({path})"
      break
  reason = (e.strerror or os.strerror(e.errno)).lower()
  return f"{where + ': ' if where else ''}{reason}; {_PATH_FIXES[e.errno]}"


def _within(path: str, directory: str) -> bool:
  """Whether `path` is `directory` or lies under it."""
  path, directory = os.path.abspath(path), os.path.abspath(directory)
  return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _shows_tracebacks(verbosity: int | None) -> bool:
  return verbosity is not None and verbosity >= logging.INFO


def verbose() -> bool:
  """Whether an absl program's `--verbosity` (parsed) asks for INFO logs and tracebacks."""
  return flags.FLAGS["verbosity"].present and _shows_tracebacks(flags.FLAGS.verbosity)


def _flag_error(e: Exception, argv: list[str]) -> str:
  """One line for an error raised while parsing `argv`."""
  loading = _config_file_being_loaded(e)
  if loading and not isinstance(e, flags.Error):  # absl passes on what is not a ValueError / TypeError
    name, value = loading
    return f"flag --{name}={value}: {_config_file_failure(e, value)}; {_config_file_fix(name)}"
  if isinstance(e, flags.IllegalFlagValueError) and e.__context__ is not None:
    # absl words it "flag --NAME=VALUE: REASON"; for a config file that raised, REASON is ml_collections'
    # formatted traceback, whose innermost error (short of one raised `from None`) says it in one line.
    inner = e
    while inner.__context__ is not None and not inner.__suppress_context__:
      inner = inner.__context__
    return f"{str(e).partition(': ')[0]}: {_plain_reason(str(inner))}"
  if isinstance(e, (KeyError, AttributeError)) and e.args:  # ml_collections: an override of no such field
    detail = e.args[0]
    while isinstance(detail, Exception) and detail.args:  # AttributeError(KeyError(text)) for a leaf
      detail = detail.args[0]
    field, _, hint = str(detail).partition("\n")  # "'trian'\nDid you mean "train" instead of "trian"?"
    names = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    name = field.strip("'")
    given = [n for n in names if name in n.split(".")[1:]]
    if given:
      return f"{' '.join(given)}: the config has no field {field}. {hint or _known_fields(e, given[0], name)}"
  required = re.fullmatch(r"flag --(\S+)=None: Flag --\S+ must have a value other than None\.", str(e))
  if required and required[1] in flags.FLAGS:
    name = required[1]
    value = next((a.partition("=")[2] for a in argv if a.startswith(f"--{name}=")), None)
    if value and config_flags_lib.is_config_flag(flags.FLAGS[name]):
      return f"flag --{name}={value}: get_config() returned None; make it return the config"
    return f"flag --{name} is required ({flags.FLAGS[name].help.rstrip('.')}): pass --{name}=VALUE"
  if isinstance(e, flags.UnrecognizedFlagError) and "Did you mean" not in str(e):
    return f"{e}; run with --helpfull to list the flags"
  if isinstance(e, (flags.Error, ValueError)):
    return _plain_reason(str(e))
  return f"{type(e).__name__}: {e}"


def _known_fields(e: Exception, override: str, field: str) -> str:
  """The fields of the section where `override` (--config.a.b.c) looked for `field`; the
  config is the one ml_collections was overriding when it raised `e`."""
  flag, *path = override[2:].split(".")
  section = [flag, *path[:path.index(field)]]
  parse = config_flags_lib._ConfigFlag._parse.__code__  # pylint: disable=protected-access
  node = next((tb.tb_frame.f_locals.get("config") for tb in _frames(e.__traceback__)
               if tb.tb_frame.f_code is parse), None)
  try:
    for key in section[1:]:
      node = node[key]
    known = sorted(node.keys())
  except Exception:  # pylint: disable=broad-except (a hint only)
    return ""
  return f"Fields of {'.'.join(section)}: {', '.join(known)}"


def _plain_reason(message: str) -> str:
  """Python's words for a value that does not parse as a number, as a user reads them."""
  message = re.sub(r"invalid literal for int\(\) with base 10: .*", "expected an integer", message)
  message = re.sub(r"could not convert string to float: .*", "expected a number", message)
  return re.sub(r"\('Non-boolean argument to boolean flag', .*\)", "expected true or false", message)


def _config_file_being_loaded(e: BaseException) -> tuple[str, str] | None:
  """(flag name, its value) when `e` was raised loading a config file (ml_collections' parser)."""
  for tb in _frames(e.__traceback__):
    if tb.tb_frame.f_code is config_flags_lib.ConfigFileFlagParser.parse.__code__:
      return tb.tb_frame.f_locals["self"].name, tb.tb_frame.f_locals["path"]
  return None


def _config_file_failure(e: BaseException, value: str) -> str:
  """What went wrong in config file `value` ("path[:argument]"): its syntax, no get_config, or where in
  the file it raised."""
  path = os.path.abspath(value.split(":", 1)[0])
  if isinstance(e, SyntaxError):
    return f"not a Python file: {e.msg} (line {e.lineno})"
  if isinstance(e, AttributeError) and e.name == "get_config":
    return "the file defines no get_config()"
  lines = [tb.tb_lineno for tb in _frames(e.__traceback__)
           if os.path.abspath(tb.tb_frame.f_code.co_filename) == path]
  return f"{type(e).__name__}: {e}" + (f" (line {lines[-1]})" if lines else "")


def _frames(tb):
  """The frames of traceback `tb`, outermost first."""
  while tb is not None:
    yield tb
    tb = tb.tb_next


def _config_file_fix(name: str) -> str:
  return (f"--{name} takes a Python file that defines get_config(), with an optional argument after ':' "
          f"(e.g. configs/mot.py:size=tiny; a relative path starts at {os.getcwd()})")


def _check_config_files() -> None:
  """A config file that failed to load (ml_collections defers the error to the first access) fails here."""
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    try:
      getattr(flag.value, "keys", None)
    except OSError as e:
      cause = e.__cause__ or e  # ml_collections' "not available because of an earlier failure" wraps it
      last = str(cause).strip().splitlines()[-1].strip()  # e.g. "[Errno 2] No such file or directory: 'x.py'"
      raise ValueError(f"flag --{name}={config_flags.get_config_filename(flag)}: {last}; "
                       f"{_config_file_fix(name)}") from e


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; anything it raises (a bad flag, a config file that is missing or raises, an
  override of no field) is refused in one line, exit status 1."""
  verbosity = verbosity_in(argv)
  if verbosity is None:
    set_logs(None)  # a config file's import may log (ml_collections warns, before absl has its flags)
  try:
    rest = flags.FLAGS(argv)
    _check_config_files()
    return rest
  except Exception as e:  # pylint: disable=broad-except (all of it comes from the command line)
    refuse(_flag_error(e, argv), tracebacks=_shows_tracebacks(verbosity))
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
