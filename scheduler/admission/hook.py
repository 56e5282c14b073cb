"""Run an admission policy's hook (a Python callable or an HTTP endpoint) and read its validate-and-mutate answer.

The contract extends the promotion hooks' (scheduler/registry/hooks.py, whose import and verdict rules are
reused): a Python hook may return what a promotion hook may (True/None, False, a reason, (bool, reason)) or a
dict {"allow": bool, "reason": str, "patch": {field: value}}; an HTTP hook is POSTed the request as JSON and
answers that dict. A hook that fails or answers nonsense refuses the job with what happened, unless the policy
says `fail_open` (an outage of the hook must not silently let everything through unless an admin chose so).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from scheduler.admission.rules import AdmissionHook, HookAnswer
from scheduler.registry.hooks import _resolve, _verdict


def run(hook: AdmissionHook, request: Mapping[str, Any]) -> HookAnswer:
    """(allowed, reason, patch) for `request`; a failure is a refusal, or an acceptance when `fail_open`."""
    return _python(hook, request) if hook.python is not None else _http(hook, request)


def _failed(hook: AdmissionHook, why: str) -> HookAnswer:
    if hook.fail_open:
        return HookAnswer(True, f"hook failed ({why}); let through: the policy's hook is fail_open")
    return HookAnswer(False, f"hook failed: {why}")


def _answer(hook: AdmissionHook, body: Any, source: str) -> HookAnswer:
    """The dict form, from either kind of hook."""
    if not isinstance(body.get("allow"), bool):
        return _failed(hook, f"{source} answered without a boolean 'allow' field")
    patch = body.get("patch") or {}
    if not isinstance(patch, dict):
        return _failed(hook, f"{source} answered a 'patch' that is not a mapping")
    allowed: bool = body["allow"]
    reason = body.get("reason")
    default = "accepted by hook" if allowed else "rejected by hook"
    return HookAnswer(allowed, reason if isinstance(reason, str) and reason else default, dict(patch))


def _python(hook: AdmissionHook, request: Mapping[str, Any]) -> HookAnswer:
    assert hook.python is not None
    # The callable runs in this process: no timeout can stop it, so it must be quick (it holds up submissions).
    try:
        result = _resolve(hook.python)(dict(request))
    except Exception as err:  # foreign code: any failure is the hook failing, with its reason
        return _failed(hook, f"{type(err).__name__}: {err}")
    if isinstance(result, dict):
        return _answer(hook, result, hook.python)
    allowed, reason = _verdict(result)
    if reason.startswith("hook returned "):  # _verdict's word for an answer of the wrong type
        return _failed(hook, reason)
    return HookAnswer(allowed, reason)


def _http(hook: AdmissionHook, request: Mapping[str, Any]) -> HookAnswer:
    assert hook.http is not None
    try:
        response = httpx.post(hook.http, json=dict(request), timeout=hook.timeout_s)
    except httpx.TimeoutException:
        return _failed(hook, f"no answer from {hook.http} within {hook.timeout_s:g}s")
    except (httpx.HTTPError, TypeError, ValueError) as err:  # network errors, or a request that is not JSON
        return _failed(hook, f"{type(err).__name__}: {err}")
    if not response.is_success:
        return _failed(hook, f"{hook.http} answered HTTP {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        return _failed(hook, f"{hook.http} answered a body that is not JSON")
    if not isinstance(body, dict):
        return _failed(hook, f"{hook.http} answered JSON that is not an object")
    return _answer(hook, body, hook.http)
