"""The request id of the work in progress, as a context variable.

Set by the HTTP middleware for each request, carried on the queue messages a request publishes
(the optional ``requestId`` queue field, beside the payload so message schemas stay stable), and
set again by a consumer while it handles such a message: one id follows a rename from the app's
HTTP request to the telemetry worker that applies it. Its own module so the queue engine needs
nothing of the web stack.
"""

from __future__ import annotations

import contextvars

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
NO_REQUEST = "-"


def current_request_id() -> str | None:
    value = REQUEST_ID.get()
    return None if value == NO_REQUEST else value
