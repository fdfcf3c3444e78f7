"""The one exception type for a user's mistake (a bad flag, file or path), apart from bugs.

It is a ValueError, so callers and tests that expect ValueError from validation still work;
`selectit_jax.cli.run_main` turns it into one `error: ...` line instead of a traceback.
"""


class UserError(ValueError):
  """Bad input from the user: the message says what is wrong and where."""
