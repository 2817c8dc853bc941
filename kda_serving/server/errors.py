"""OpenAI's error format, for every error the server answers.

Every 4xx and 5xx body is `{"error": {"message", "type", "param", "code"}}`, the shape the official clients parse
into their exception classes. Handlers raise `APIError`; the app turns it, FastAPI's own HTTP errors (unknown
route, wrong method) and unexpected exceptions into this format, so no request ever gets a bare traceback and
the server keeps serving.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

# OpenAI's `type` for each status we answer.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "requests",  # what OpenAI sends for a request-count limit (code "rate_limit_exceeded")
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A request the server refuses; carries the HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # sent with the answer, e.g. a 429's Retry-After

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body OpenAI sends for an error with this status."""
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
