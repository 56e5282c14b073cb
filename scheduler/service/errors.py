"""Errors the service answers with: an HTTP status, a stable code, what is wrong, and where (a field)."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, where: str | None = None, detail: object = None):
        super().__init__(message)
        self.message, self.where, self.detail = message, where, detail

    def body(self) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code, "message": self.message}
        if self.where:
            out["where"] = self.where
        if self.detail is not None:
            out["detail"] = self.detail
        return {"error": out}


class Invalid(ServiceError):
    status, code = 422, "invalid"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class NotStarted(ServiceError):
    """Asked for what a job has only once it runs (its logs)."""

    status, code = 404, "not_started"
