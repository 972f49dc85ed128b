"""The errors a user can fix: what `cli.main` prints as one sentence. Everything else keeps its traceback.

Raise these where user input is checked (a config value, a flag, a file or directory the user named, a workdir);
a plain ValueError or RuntimeError means a bug (ours or a library's) and reaches the user with its traceback.
Each also derives from the builtin it replaces, so `except ValueError` around a user check still catches it.
"""


class UserError(Exception):
  """Something the user gave or can change; the message is one sentence that says what and, where it can, how."""


class InvalidInput(UserError, ValueError):
  """A config value, flag or file content that cannot work."""


class RunStopped(UserError, RuntimeError):
  """A run stopped for a cause outside the code (a diverging loss, a peer that never came up)."""
