"""The project's own errors: one family, so the entry point can tell them from bugs.

Every message is one line that names the problem and the fix. `main` prints an `AlphafuseError`
as that line on stderr and exits with code 2 (the traceback only with `--debug` or
ALPHAFUSE_DEBUG=1); anything else is a bug and keeps its traceback. All are `ValueError`s, so
code that caught ValueError before still does.
"""


class AlphafuseError(ValueError):
  """Base of the project's errors: bad input, not a bug."""


class ConfigError(AlphafuseError):
  """A config value is invalid or inconsistent, or differs from the workdir's recorded one."""


class DataError(AlphafuseError):
  """Bad input data: the message names the file, the line or field, and the fix."""


class DataFileNotFoundError(DataError, FileNotFoundError):
  """A source file or package is missing: the message says how to get it."""


class WorkdirError(AlphafuseError):
  """The workdir cannot be used: not writable, or in use by another run."""


class CheckpointError(AlphafuseError):
  """No checkpoint in the workdir can be restored: the message names the directory to remove."""


def one_line(error: BaseException) -> str:
  """`error`'s message on one line (newlines folded), prefixed with its class name."""
  text = ' '.join(str(error).split('\n')).strip()
  return f'{type(error).__name__}: {text}'
