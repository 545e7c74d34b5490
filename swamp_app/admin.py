"""The app's /admin endpoints (ADMIN_TOKEN): delete a user, and the score-refresh queue it
consumes."""

from __future__ import annotations

from fastapi import APIRouter, Response

from shared_contracts.admin_api import ADMIN_ERRORS, ADMIN_ONLY, queue_admin_router
from shared_contracts.api_errors import error_responses
from shared_contracts.names import SWAMP_CLUB_EVENTS
from swamp_app.deps import RuntimeDep
from swamp_app.usernames import Username
from swamp_app.users.service import delete_user, find_user

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=ADMIN_ONLY, responses=ADMIN_ERRORS)


@router.delete(
    "/users/{username}",
    status_code=204,
    response_class=Response,
    responses=error_responses(404, 422),
)
async def delete_account(username: Username, runtime: RuntimeDep) -> Response:
    """Delete a user as an operator (abuse, a deletion request by mail): the same deletion as
    `DELETE /v1/users/me`."""
    user = await find_user(runtime, username)
    await delete_user(runtime, user_id=user["_id"])
    return Response(status_code=204)


#: The queue this service consumes: its dead letters are the app's to inspect and retry.
queue_router = queue_admin_router(SWAMP_CLUB_EVENTS)
