"""The username rules: 3-39 lowercase letters, digits and single hyphens, no hyphen at either
end. Each rule fails with its own message, so a 422 says which one was broken."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

#: Matched whole (``fullmatch``): with ``match`` and ``$``, "zed\n" passed, since ``$`` also
#: matches before a final newline, and the message schema then refused it mid-request (a 500).
_ALLOWED = re.compile(r"[a-z0-9-]*")


def check_username(value: str) -> str:
    if not 3 <= len(value) <= 39:
        raise ValueError("a username has 3 to 39 characters")
    if not _ALLOWED.fullmatch(value):
        raise ValueError("a username has only lowercase letters, digits and hyphens")
    if value.startswith("-") or value.endswith("-"):
        raise ValueError("a username does not start or end with a hyphen")
    if "--" in value:
        raise ValueError("a username has no consecutive hyphens")
    return value


Username = Annotated[
    str,
    Field(description="3-39 lowercase letters, digits and single hyphens, not at either end"),
    AfterValidator(check_username),
]
