"""FastAPI dependencies, as Annotated aliases, in one place."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Request

from shared_contracts.keys import presented_key
from swamp_app.api_keys.service import user_for_key
from swamp_app.errors import Unauthorized
from swamp_app.runtime import AppRuntime


def get_runtime(request: Request) -> AppRuntime:
    runtime: AppRuntime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[AppRuntime, Depends(get_runtime)]


async def get_current_user(
    runtime: RuntimeDep,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """The user of the presented API key: `Authorization: Bearer <key>` (or the CLI's
    `x-api-key`). 401 for a missing, unknown or revoked key."""
    key = presented_key(x_api_key, authorization)
    user = await user_for_key(runtime, key) if key else None
    if user is None:
        raise Unauthorized("a valid API key is required")
    return user


CurrentUser = Annotated[dict[str, Any], Depends(get_current_user)]
