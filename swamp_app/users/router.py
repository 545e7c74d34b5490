"""Users: register, rename or delete yourself, look someone up, and the CLI's whoami."""

from __future__ import annotations

from fastapi import APIRouter, Response

from shared_contracts.api_errors import error_responses
from swamp_app.deps import CurrentUser, RuntimeDep
from swamp_app.usernames import Username
from swamp_app.users.schemas import UserCreate, UserCreated, UserPublic, UserRename, Whoami
from swamp_app.users.service import delete_user, find_user, register_user, rename_user

router = APIRouter(tags=["users"])


@router.post(
    "/v1/users",
    status_code=201,
    response_model=UserCreated,
    responses=error_responses(400, 409, 413, 422),
)
async def register(body: UserCreate, runtime: RuntimeDep) -> UserCreated:
    """Open registration. The answer carries the user's first API key, shown only this once."""
    user, raw_key = await register_user(runtime, username=body.username)
    return UserCreated(id=user["_id"], username=user["username"], apiKey=raw_key)


@router.patch(
    "/v1/users/me",
    response_model=UserPublic,
    responses=error_responses(400, 401, 404, 409, 413, 422),
)
async def rename(body: UserRename, user: CurrentUser, runtime: RuntimeDep) -> UserPublic:
    """Rename yourself: 409 if the name is taken; your own name is a no-op."""
    renamed = await rename_user(runtime, user_id=user["_id"], new_username=body.username)
    return UserPublic.of(renamed)


@router.get("/v1/users/me", response_model=UserPublic, responses=error_responses(400, 401))
async def get_me(user: CurrentUser) -> UserPublic:
    """Yourself. Declared before /v1/users/{username}, which would otherwise take "me"."""
    return UserPublic.of(user)


@router.delete(
    "/v1/users/me", status_code=204, response_class=Response, responses=error_responses(400, 401)
)
async def delete_me(user: CurrentUser, runtime: RuntimeDep) -> Response:
    """Delete your account: every API key stops working here and at telemetry's ingest, your
    score leaves the leaderboard, and your username stays reserved."""
    await delete_user(runtime, user_id=user["_id"])
    return Response(status_code=204)


@router.get("/v1/users/{username}", response_model=UserPublic, responses=error_responses(404, 422))
async def get_user(username: Username, runtime: RuntimeDep) -> UserPublic:
    return UserPublic.of(await find_user(runtime, username))


@router.get("/api/whoami", response_model=Whoami, responses=error_responses(400, 401))
async def whoami(user: CurrentUser) -> Whoami:
    """What the swamp CLI calls with `x-api-key` to learn its username."""
    return Whoami(id=user["_id"], username=user["username"])
