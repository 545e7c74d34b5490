"""The signed-in user's API keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from shared_contracts.api_errors import error_responses
from swamp_app.api_keys.service import issue_key_for, revoke_key
from swamp_app.deps import CurrentUser, RuntimeDep
from swamp_app.users.schemas import ApiKeyCreated

router = APIRouter(prefix="/v1/users/me/api-keys", tags=["api keys"])


@router.post("", status_code=201, response_model=ApiKeyCreated, responses=error_responses(400, 401))
async def create_key(user: CurrentUser, runtime: RuntimeDep) -> ApiKeyCreated:
    record, raw = await issue_key_for(runtime, user_id=user["_id"])
    return ApiKeyCreated(id=record["_id"], apiKey=raw, createdAt=record["createdAt"])


@router.delete(
    "/{key_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(400, 401, 404, 422),
)
async def delete_key(
    key_id: Annotated[str, Path(min_length=1, max_length=64)],
    user: CurrentUser,
    runtime: RuntimeDep,
) -> Response:
    await revoke_key(runtime, user_id=user["_id"], key_id=key_id)
    return Response(status_code=204)
