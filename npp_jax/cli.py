"""How every entry point runs: absl flags (underscored names), `--config FILE` with `--config.key=value` overrides,
`--help`, and a user error (`npp_jax.errors.UserError`, or an OSError: a missing file, a full disk, a permission)
as one sentence on stderr with exit status 1. Any other exception is a bug and keeps its traceback.

An entry point defines its flags on the FlagValues it is handed (a fresh one per call, so tests can call `main`
repeatedly in one process), and a body that takes the parsed flags and returns its one-line result:

  def define_flags(fv, argv):
    cli.define_config(fv, argv, "Config file (configs/tiny.py).", config_schema.TRAINER)
    flags.DEFINE_string("out", None, "Output directory.", flag_values=fv, required=True)

  def run(fv) -> str:
    ...
    return f"wrote {fv.out}"

  def main(argv=None) -> int:
    return cli.main(run, define_flags, argv, doc=__doc__, required=("config", "out"))
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
import weakref
from typing import Callable, Mapping, Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from npp_jax import config as config_lib
from npp_jax import config_schema
from npp_jax import errors

# Mistakes in the command, its files or its environment; OSError names the path, and it is the user's to fix.
USER_ERRORS = (errors.UserError, OSError)
HELP_FLAGS = ("--help", "-h", "--helpfull", "-?")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SCHEMAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # FlagValues -> the schema of its --config


def _own_info_or_any_warning(record: std_logging.LogRecord) -> bool:
  """This package's INFO lines, everyone's warnings: Orbax and XLA log every save and compile at INFO."""
  return record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def setup_logging() -> None:
  """absl logging on stderr: this package's messages from INFO up, other libraries' from WARNING up."""
  flags.FLAGS.mark_as_parsed()  # Entry points parse their own FlagValues; absl would warn about the global ones.
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if _own_info_or_any_warning not in handler.filters:
    handler.addFilter(_own_info_or_any_warning)


def one_line(error: BaseException | str) -> str:
  """The message on one line, even when it was written over several."""
  return " ".join(str(error).split())


def define_config(fv: flags.FlagValues, argv: Sequence[str], help_text: str, schema: config_schema.Schema,
                  default: str | None = None) -> None:
  """`--config FILE` (a Python file with get_config()) plus its `--config.key=value` overrides; the result is checked
  against `schema` when the command line is parsed, before the command runs."""
  # sys_argv: config_flags finds the overrides there (it would read sys.argv otherwise, wrong when called in-process).
  config_flags.DEFINE_config_file("config", default, help_text, flag_values=fv, sys_argv=list(argv),
                                  lock_config=True)
  _SCHEMAS[fv] = schema


def _config_value_error(fv: flags.FlagValues, error: flags.IllegalFlagValueError) -> str:
  """The sentence for a `--config.key=value` the flag parser could not read as the field's type: the field's rule."""
  found = re.match(r"flag --config\.([\w.]+)=(.*?): ", str(error))
  rule = _SCHEMAS[fv].rule(found.group(1)) if found and fv in _SCHEMAS else None
  if rule is None:
    return f"bad command line: {one_line(error)}"
  return config_schema.refusal(found.group(1), found.group(2), rule)


def _check_override_names(fv: flags.FlagValues, argv: list[str]) -> None:
  """A `--config.key=value` whose key the config's schema does not know, named with the nearest field."""
  if fv not in _SCHEMAS or not any(a == "--config" or a.startswith("--config=") for a in argv):
    return  # no config file: the flag parser says so
  for arg in argv[1:]:
    found = re.match(r"--config\.([\w.]+)(=|$)", arg)
    unknown = found and config_schema.unknown_field(found.group(1), _SCHEMAS[fv])
    if unknown:
      raise errors.InvalidInput(f"--config.{found.group(1)}: {unknown}")


def _parse(fv: flags.FlagValues, argv: list[str], required: Sequence[str]) -> None:
  config_lib.check_config_argument(argv)  # a broken config file: one ValueError, not config_flags' traceback
  _check_override_names(fv, argv)
  try:
    rest = fv(argv)
  except flags.IllegalFlagValueError as e:
    raise errors.InvalidInput(_config_value_error(fv, e)) from None
  except flags.UnrecognizedFlagError as e:
    if e.flagname.startswith("config.") and "config" in fv and fv["config"].value is None:
      raise errors.InvalidInput(f"--{e.flagname} overrides a field of --config FILE, which is not given") from None
    raise errors.InvalidInput(f"bad command line: {one_line(e)} (see --help)") from None
  except flags.Error as e:
    raise errors.InvalidInput(f"bad command line: {one_line(e)} (see --help)") from None
  except (KeyError, AttributeError, TypeError) as e:  # ConfigDict's answer to an override it cannot take.
    detail = e
    while isinstance(detail, Exception) and detail.args:  # AttributeError(KeyError("'x'\nDid you mean ...")).
      detail = detail.args[0]
    raise errors.InvalidInput(f"bad --config override (unknown field or wrong type): {one_line(detail)}") from None
  if len(rest) > 1:
    raise errors.InvalidInput(f"unexpected arguments {rest[1:]} (see --help)")
  for name in required:
    if fv[name].value is None:
      raise errors.InvalidInput(f"--{name} is required (see --help)")
  if fv in _SCHEMAS and fv["config"].value is not None:
    config_schema.check(fv.config, _SCHEMAS[fv])


def main(body: Callable[[flags.FlagValues], str | None],
         define_flags: Callable[[flags.FlagValues, list[str]], None], argv: Sequence[str] | None = None, *,
         doc: str = "", required: Sequence[str] = ()) -> int:
  """Parses argv (program name first; default sys.argv), runs `body` and returns the exit status.

  `required` names the flags that must be given; `body`'s return value, if any, is printed as the command's result.
  """
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  define_flags(fv, argv)
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(doc.strip() + "\n\nflags:\n" + fv.get_help(include_special_flags=False))
    return 0
  setup_logging()
  try:
    _parse(fv, argv, required)
    result = body(fv)
  except USER_ERRORS as e:
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    return 1
  if result:
    print(result, flush=True)
  return 0


def main_with_commands(commands: Mapping[str, Callable[[flags.FlagValues], str | None]],
                       define_flags: Callable[[flags.FlagValues, list[str]], None],
                       argv: Sequence[str] | None = None, *, doc: str = "") -> int:
  """`prog COMMAND [--flag ...]`: the first argument picks the body from `commands`; the flags are shared."""
  argv = list(sys.argv if argv is None else argv)
  command = argv[1] if len(argv) > 1 else None
  if command in commands:
    return main(commands[command], define_flags, [argv[0], *argv[2:]], doc=doc)
  if any(a in HELP_FLAGS for a in argv[1:]):
    return main(lambda fv: None, define_flags, argv, doc=doc)
  print(f"error: the first argument must be one of {', '.join(commands)} (see --help)", file=sys.stderr)
  return 1
