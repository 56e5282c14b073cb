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


class TooLarge(ServiceError):
    """A request body over max_request_bytes (refused before it is parsed)."""

    status, code = 413, "too_large"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class NotStarted(ServiceError):
    """Asked for what a job has only once it runs (its logs)."""

    status, code = 404, "not_started"


# Codes of the HTTP errors FastAPI answers by itself, in the shape of ServiceError.body.
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


def http_error_body(status: int, detail: str) -> dict[str, object]:
    """FastAPI's own refusals (a body it could not parse, an unknown path or method) as the API's error body."""
    if status == 400:  # FastAPI says only "There was an error parsing the body": say what to send instead
        detail = f"{detail}: send one JSON object (Content-Type: application/json), nested at most a few levels"
        return {"error": {"code": HTTP_CODES[400], "message": detail, "where": "body"}}
    return {"error": {"code": HTTP_CODES.get(status, f"http_{status}"), "message": detail}}
