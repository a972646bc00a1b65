"""How the command-line programs report a user's mistake: one line, not a traceback.

An error that this project's own code raises (in landmark_jax/ or
data_pipelines/) carries a message written for the user: the file, key or
value at fault and what to do. The programs print that message after
`error:` and exit with status 1; `--traceback` shows the whole traceback as
well. A bad `--config.KEY=VALUE` flag is reported the same way, with
ml_collections' "did you mean". Errors raised inside a library (JAX,
TensorFlow, Orbax), and the exception types that usually mean a bug here
(KeyError, TypeError, AssertionError...), keep their full traceback: they
are not ours to summarise.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "On an error, print the whole traceback, not only its message."
)

# The repository (or site-packages) folder that holds landmark_jax/ and data_pipelines/.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OUR_CODE = tuple(
    os.path.join(_PACKAGE_ROOT, name) + os.sep for name in ("landmark_jax", "data_pipelines")
)
# What the project raises for bad input (bad values, files, data; a workdir in
# use; a non-finite loss). Exception types that mean a bug are not here.
_USER_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)


def refuse_arguments(argv: Sequence[str]) -> None:
    """The usage check of every program: flags only, no positional arguments.

    Raises:
      app.UsageError: anything after the program's name that absl did not
        take as a flag, named.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")


def raised_by_project(error: BaseException) -> bool:
    """True if the innermost frame of `error`'s traceback is in this project's code."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OUR_CODE)


def is_user_error(error: BaseException) -> bool:
    """An error whose message is the whole story for the user (see the module docstring)."""
    return isinstance(error, _USER_ERRORS) and raised_by_project(error)


def config_override_message(error: Exception, argv: Sequence[str]) -> str:
    """A one-line message for a `--config...` flag that ml_collections refused.

    ml_collections raises AttributeError('\\'key\\'\\nDid you mean "k" ...')
    for an unknown key, with neither the flag nor a readable text.
    """
    text = str(error).replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    names = re.findall(r"'([A-Za-z_]\w*)'", text)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    flag = None
    if names:
        for arg in argv:
            name = arg.split("=", 1)[0]
            if name.startswith("--config.") and names[0] in name.split("."):
                flag = arg
                break
    if isinstance(error, AttributeError) and names:
        hint = f'; did you mean "{suggestion.group(1)}"?' if suggestion else ""
        return f"{flag or '--config'}: the config has no key {names[0]!r}{hint}"
    # The config file itself (not found, or failed to import): its flag.
    flag = flag or next((a for a in argv if a.startswith("--config=")), "--config")
    text = text.replace(
        "Configuration is not available because of an earlier failure to load: ", ""
    )
    return f"{flag}: {' '.join(text.split())}"


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        remaining = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS["config"].present:
            # A config file that failed to load is reported on first use.
            flags.FLAGS.config.keys()
        return remaining
    except flags.Error as e:
        _exit(str(e))
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        if _wants_traceback(argv):
            raise
        _exit(config_override_message(e, argv))


def _wants_traceback(argv: Sequence[str]) -> bool:
    # Read from argv: a parse that failed may not have set the flag.
    return any(a in ("--traceback", "--traceback=true", "--traceback=True") for a in argv)


def _exit(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(1)


def run(main: Callable[[list[str]], int | None]) -> None:
    """`absl.app.run(main)`, with user errors printed as `error: <message>` (exit 1)."""

    def main_reporting_errors(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except Exception as e:
            if _TRACEBACK.value or not is_user_error(e):
                raise
            if getattr(e, "errno", None) == errno.ENOSPC:
                # A full disk leaves Orbax's writer threads with failed writes
                # that print hundreds of lines as the interpreter shuts down:
                # the message is the last word, and nothing runs after it.
                sys.stderr.write(f"error: {e}\n")
                sys.stderr.flush()
                os._exit(1)
            _exit(f"{e}\n(rerun with --traceback to see where it was raised)")

    app.run(main_reporting_errors, flags_parser=_parse_flags)
