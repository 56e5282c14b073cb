"""Commands for `submit(script=...)` and `submit(function=...)`.

A function travels in the job's argv: cloudpickle of (function, args, kwargs), base64, run by a small bootstrap
under `python -c`. Nothing has to be copied to the machine that runs the job, but the job's Python must have
the same major.minor version and cloudpickle, and modules the function imports by name must be importable
there (functions and classes defined in the notebook itself travel by value).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cloudpickle

from notebooks.errors import CorralError

# Linux refuses one argv string over 32 pages (MAX_ARG_STRLEN, 128 KiB) with E2BIG at launch; refuse earlier,
# with a message, and leave room for the job's environment.
MAX_PAYLOAD = 100_000
# Kept on few lines: it is what `corral ps`/the API show as the job's command. The return value's repr is
# printed last, on a line of its own, so Job.result() (and a person reading the log) finds it.
BOOTSTRAP = (
    "import base64,sys,cloudpickle\n"
    "f,a,k=cloudpickle.loads(base64.b64decode(sys.argv[1]))\n"
    "r=f(*a,**k)\n"
    "print(repr(r),flush=True)\n"
)


def function_command(
    python: str, function: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any] | None
) -> list[str]:
    """argv that calls function(*args, **kwargs) in the job and prints repr() of what it returns."""
    if not callable(function):
        raise TypeError(f"function= must be callable, not {type(function).__name__}")
    try:
        blob = cloudpickle.dumps((function, tuple(args), dict(kwargs or {})))
    except Exception as e:  # cloudpickle raises many kinds (PicklingError, TypeError on locks, sockets, ...)
        raise CorralError(
            "unpicklable",
            f"cannot ship {getattr(function, '__name__', function)!r} to the job: {e.__class__.__name__}: {e}",
            "function",
        ) from e
    text = base64.b64encode(blob).decode("ascii")
    if len(text) > MAX_PAYLOAD:
        raise CorralError(
            "too_large",
            f"the pickled function and its arguments are {len(text)} bytes in base64, "
            f"over the {MAX_PAYLOAD} that fit in a command line: pass file paths "
            "instead of data, or submit a script",
            "function",
        )
    return [python, "-c", BOOTSTRAP, text]


def script_command(python: str, script: str | os.PathLike[str], args: Sequence[Any]) -> list[str]:
    """argv that runs `python script args...`."""
    return [python, os.fspath(script), *(str(a) for a in args)]


def default_python() -> str:
    """The interpreter a job runs: CORRAL_PYTHON, else `python` on the job's PATH (not sys.executable: the
    job may run on another machine, where this notebook's interpreter path means nothing)."""
    return os.environ.get("CORRAL_PYTHON") or "python"
