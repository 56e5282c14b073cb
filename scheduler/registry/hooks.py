"""Adapter: run a promotion policy's hook, a Python callable or an HTTP endpoint, and read its verdict.

Whatever goes wrong (import error, exception, timeout, bad answer) rejects the promotion with a reason that
says what happened: a hook that cannot give an answer must not let a version through.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import httpx

from scheduler.registry.policy import Hook


def _resolve(target: str) -> Any:
    module_name, _, attr_path = target.partition(":")
    # Importing by name at call time is the point of a hook: the policy names code the scheduler does not know.
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    return obj


def _verdict(result: Any) -> tuple[bool, str]:
    """A Python hook's return value: True/None accept, False or a str reject, or an explicit (bool, reason)."""
    if result is None or result is True:
        return True, "accepted by hook"
    if result is False:
        return False, "rejected by hook"
    if isinstance(result, str):
        return False, result or "rejected by hook"
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool):
        allowed, reason = result
        return allowed, str(reason) or ("accepted by hook" if allowed else "rejected by hook")
    return False, f"hook returned {type(result).__name__}, expected True, None, False, a reason or (bool, reason)"


def _python(hook: Hook, request: Mapping[str, Any]) -> tuple[bool, str]:
    assert hook.python is not None
    # No timeout here: the callable runs in this process, and stopping it would take a thread or a signal.
    try:
        func = _resolve(hook.python)
        return _verdict(func(dict(request)))
    except Exception as err:  # any failure of foreign code is a rejection with its reason
        return False, f"hook failed: {type(err).__name__}: {err}"


def _http(hook: Hook, request: Mapping[str, Any]) -> tuple[bool, str]:
    assert hook.http is not None
    try:
        response = httpx.post(hook.http, json=dict(request), timeout=hook.timeout_s)
    except httpx.TimeoutException:
        return False, f"hook failed: no answer from {hook.http} within {hook.timeout_s:g}s"
    except (httpx.HTTPError, TypeError, ValueError) as err:  # network errors, or a request that is not JSON
        return False, f"hook failed: {type(err).__name__}: {err}"
    if not response.is_success:
        return False, f"hook failed: {hook.http} answered HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return False, f"hook failed: {hook.http} answered HTTP {response.status_code} with a body that is not JSON"
    if not isinstance(body, dict) or not isinstance(body.get("allow"), bool):
        return False, (f"hook failed: {hook.http} answered HTTP {response.status_code} without a boolean 'allow' field")
    allowed: bool = body["allow"]
    reason = body.get("reason")
    default = "accepted by hook" if allowed else "rejected by hook"
    return allowed, reason if isinstance(reason, str) and reason else default


def run_hook(hook: Hook, request: Mapping[str, Any]) -> tuple[bool, str]:
    """Run `hook` on `request` (the promotion's facts as a JSON-able dict): (allowed, reason)."""
    return _python(hook, request) if hook.python is not None else _http(hook, request)
