"""The telemetry service's API errors (the shape is shared_contracts.api_errors)."""

from shared_contracts.api_errors import ApiError, NotFound, Unauthorized, install_error_handlers

__all__ = [
    "ApiError",
    "InvalidEvents",
    "InvalidJson",
    "InvalidQuery",
    "NotFound",
    "PayloadTooLarge",
    "Unauthorized",
    "install_error_handlers",
]


class InvalidJson(ApiError):
    status_code, code = 400, "invalid_json"


class InvalidEvents(ApiError):
    status_code, code = 422, "invalid_events"


class PayloadTooLarge(ApiError):
    status_code, code = 413, "payload_too_large"


class InvalidQuery(ApiError):
    status_code, code = 422, "invalid_query"
