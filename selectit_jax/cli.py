"""`run_main`: absl's `app.run` for every command, with user errors as one `error:` line.

A user's mistake (a missing or unreadable input, a bad flag or config value, a model path that
does not exist, a run that does not fit) ends with `error: <what and where>` as the last line
on stderr and exit status 2; a bug still ends with its traceback. Which is which is decided by
exception type:

- `UserError` (a ValueError) and ValueError: every validation site in the package raises
  ValueError with a message naming the flag or file (json.JSONDecodeError and
  UnicodeDecodeError are ValueErrors too: a file that is not what it should be). A bug can
  raise ValueError as well; `SELECTIT_TRACEBACK=1` re-raises so its traceback shows.
- FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError: a path the user
  gave is wrong.
- MemoryError: `parallel/memory.py`'s pre-flight check refuses a run that will not fit.

Every other exception (TypeError, KeyError, AttributeError, ...) is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app
from absl import flags

from selectit_jax.errors import UserError

USER_ERRORS = (
    UserError,
    ValueError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    MemoryError,
    app.UsageError,
)
EXIT_USER_ERROR = 2
_TRACEBACK_ENV = "SELECTIT_TRACEBACK"


def run_main(main: Callable[[list[str]], int | None]) -> None:
  """`app.run(main)`, with flag errors and `USER_ERRORS` from main as one `error:` line."""
  app.run(_guarded(main), flags_parser=_parse_flags)


def force_cpu() -> None:
  """Pins JAX to the CPU platform; call first in the main of a command that needs no
  accelerator (plan, select, sweep).

  launch/tpu_pod.sh runs those on worker 0 only. On one host of a multi-host TPU slice,
  initialising the TPU backend blocks until every host joins, so such a step would hang;
  on CPU it cannot. Also keeps a GPU node's memory free for a score run beside it.
  """
  import jax  # noqa: PLC0415  (importing does not initialise a backend)

  jax.config.update("jax_platforms", "cpu")


def fail(message: str) -> None:
  """Prints a message's detail lines, then `error: <last line>`, and exits with status 2.

  A multi-line message (the memory check's table) keeps its lines as context; its last line
  is the summary, so the error line stays the last line on stderr.
  """
  lines = [line.rstrip() for line in str(message).splitlines() if line.strip()]
  lines = lines or ["(no message)"]
  sys.stdout.flush()
  for line in lines[:-1]:
    print(line, file=sys.stderr)
  print(f"error: {lines[-1].strip()}", file=sys.stderr)
  sys.stderr.flush()
  sys.exit(EXIT_USER_ERROR)


def _guarded(main):
  def guarded(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if os.environ.get(_TRACEBACK_ENV):
        raise
      fail(str(e) or type(e).__name__)

  return guarded


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag value or config file as one `error:` line."""
  try:
    argv = flags.FLAGS(argv)
  except flags.Error as e:
    fail(_flag_error(str(e)))
  for name in flags.FLAGS:
    # config_flags defers a config file it could not open (a stand-in that raises OSError on
    # first use, inside main); report it here, before main runs.
    error = getattr(flags.FLAGS[name].value, "_error", None)
    if isinstance(error, OSError):
      fail(f"--{name}: {str(error).strip().splitlines()[-1].strip()}")
  return argv


def _flag_error(message: str) -> str:
  """One line for a flag error. config_flags embeds the traceback of a ValueError raised by a
  config file's get_config (an unknown preset); its last line is the error itself."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if len(lines) > 1 and "Traceback (most recent call last):" in lines:
    if not lines[-1].startswith("ValueError"):
      print(message, file=sys.stderr)  # a bug in the config file: keep its traceback
    return f"{lines[0]} {lines[-1]}"
  return " ".join(lines)
