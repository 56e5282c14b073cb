"""What every request body must be before anything reads it: finite numbers, numbers that are not booleans, strings
without NUL characters, bounded sizes.

`Body` is the base of every request body model (job specs, sandboxes, queue documents, models, tokens, admission).
Its config refuses NaN and +-Infinity in typed float fields (Python's JSON parser reads `NaN`, `Infinity` and `1e309`
as floats), and one validator run on every field refuses, anywhere inside the value (the keys and values of free-form
documents too):

- a non-finite number: infinity minus infinity is NaN, and one NaN among the free CPUs stalls every queue;
- a boolean where the field takes no boolean: Python's `True == 1`, so `{"version": true}` would read as version 1;
- a NUL character: C strings end there, so what a process or the filesystem sees differs from what was checked.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from scheduler.engine.model import non_finite

# Sizes. A body is at most max_request_bytes (1 MiB by default) as a whole; these bound the parts of a job spec
# so that one field cannot take all of it and so that what is stored, listed and passed to exec stays small.
MAX_COMMAND_ARGS = 4096  # argv entries
MAX_COMMAND_BYTES = 64 * 1024  # argv (or the shell string) in UTF-8 bytes, all together: Linux's ARG_MAX is 2 MiB
MAX_ENV = 256  # environment variables a job may set
MAX_ENV_NAME = 256  # characters of a variable's name
MAX_ENV_VALUE = 32 * 1024  # characters of one value (Linux limits one argv/env string to 128 KiB)
MAX_LABELS = 64  # labels per job (Kubernetes allows more, but a job's labels are for people and filters)
MAX_LABEL_KEY = 253  # characters: a Kubernetes label key with its prefix
MAX_LABEL_VALUE = 1024  # characters
MAX_PATH = 4096  # characters of a working directory: Linux's PATH_MAX
MAX_IMAGE = 1024  # characters of an image reference
MAX_AMOUNT = 1_000_000.0  # CPUs or GiB per worker: far above any machine, far below where float sums lose units
MAX_DOC_ITEMS = 100_000  # values a free-form document may hold (the body limit bounds it too; this bounds the walk)

Amount = Annotated[float, Field(ge=0, le=MAX_AMOUNT)]


def _allows(annotation: Any, wanted: tuple[Any, ...]) -> bool:
    """`annotation` mentions one of `wanted` anywhere (in a union, a container, an Annotated). A nested model counts
    as one: it checks its own fields (a rule's `defaults` may well hold `preemptible: false`)."""
    if annotation in wanted or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _allows(typing.get_args(annotation)[0], wanted)
    if origin is None and not isinstance(annotation, types.UnionType):
        return False
    return any(_allows(a, wanted) for a in typing.get_args(annotation))


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    """(path inside `value`, leaf) for every key and leaf, iteratively (a deep document must not overflow the
    stack), at most MAX_DOC_ITEMS of them."""
    stack: list[tuple[str, Any]] = [("", value)]
    seen = 0
    while stack:
        path, v = stack.pop()
        seen += 1
        if seen > MAX_DOC_ITEMS:
            raise ValueError(f"holds more than {MAX_DOC_ITEMS} values")
        if isinstance(v, BaseModel):  # already validated by its own model
            continue
        if isinstance(v, Mapping):
            for k, x in v.items():
                sub = f"{path}.{k}" if path else str(k)
                yield sub, k
                stack.append((sub, x))
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{path}.{i}" if path else str(i), x) for i, x in enumerate(v))
        else:
            yield path, v


def problem(value: Any, booleans: bool) -> str | None:
    """What is wrong with `value` (and where inside it), or None: a non-finite number, a NUL character, or a boolean
    where `booleans` is False."""
    for path, leaf in _walk(value):
        at = f" (at {path})" if path else ""
        if isinstance(leaf, bool):
            if not booleans:
                return f"{str(leaf).lower()} is a boolean, not a number{at}"
        elif (shown := non_finite(leaf)) is not None:
            return (
                f"{shown} is not a finite number{at}: NaN and Infinity (or a number too large for a double, "
                "such as 1e309) are refused"
            )
        elif isinstance(leaf, str) and "\0" in leaf:
            return f"a NUL character is not allowed in text{at}"
    return None


class Body(BaseModel):
    """Base of every request body: unknown fields, non-finite numbers, booleans for numbers and NUL are errors."""

    # Unknown fields are errors: a typo in "preemptable" must not silently run a job the wrong way.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _edge(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        annotation = cls.model_fields[name].annotation if name in cls.model_fields else Any
        why = problem(value, booleans=_allows(annotation, (bool, Any)))
        if why is not None:
            raise ValueError(why)
        return value
