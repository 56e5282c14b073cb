"""The exceptions the SDK raises: every API error as one CorralError, and JobFailed from Job.wait()."""

from __future__ import annotations

from typing import Any


class CorralError(Exception):
    """The API refused a request (or could not be reached): a stable `code`, a `message`, and `where` (a
    field of the request, when the API names one). str() is the line a user reads."""

    def __init__(
        self, code: str, message: str, where: str | None = None, *, status: int | None = None, detail: Any = None
    ) -> None:
        super().__init__(code, message, where)
        self.code, self.message, self.where = code, message, where
        self.status, self.detail = status, detail

    def __str__(self) -> str:
        where = f" (at {self.where})" if self.where and self.where not in self.message else ""
        return f"{self.message}{where} [{self.code}]"


class JobFailed(CorralError):
    """A job Job.wait() waited for ended failed, cancelled or rejected. `code` is that state; `reason` the
    API's {"rule", "message", "numbers"}; `stderr_tail` the last lines the job wrote to stderr, if any."""

    def __init__(
        self, job_id: int, state: str, reason: dict[str, Any] | None, exit_code: int | None, stderr_tail: str = ""
    ) -> None:
        why = (reason or {}).get("message") or state
        message = f"job {job_id} {state}: {why}"
        if stderr_tail:
            message += f"\n--- last lines of its stderr ---\n{stderr_tail.rstrip()}"
        super().__init__(state, message)
        self.job_id, self.state, self.reason, self.exit_code = job_id, state, reason, exit_code
        self.stderr_tail = stderr_tail

    def __str__(self) -> str:
        return self.message
