"""The app's API errors (the shape is shared_contracts.api_errors)."""

from shared_contracts.api_errors import (
    ApiError,
    Conflict,
    NotFound,
    Unauthorized,
    install_error_handlers,
)

__all__ = [
    "ApiError",
    "Conflict",
    "NotFound",
    "Unauthorized",
    "UsernameTaken",
    "install_error_handlers",
]


class UsernameTaken(Conflict):
    code = "username_taken"
