"""Admin routes: POST /admin/drain and /admin/undrain, behind a bearer token.

Mounted only when CATTLE_ADMIN_TOKEN is set: with no token the routes do not
exist (404), so a node without one has no admin surface at all. The token is
compared in constant time so its prefix cannot be found by timing.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import NAME, node
from service.config import env_var
from service.health.drain import ADMIN, CannotUndrain, DrainController
from service.problems import Problem

_bearer = HTTPBearer(auto_error=False, description=env_var("admin_token"))


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 without a bearer token, 403 with the wrong one."""
    if credentials is None:
        raise Problem(
            401,
            f"send the admin token as `Authorization: Bearer <{env_var('admin_token')}>`",
            slug="unauthorized",
            headers={"WWW-Authenticate": f'Bearer realm="{NAME}-admin"'},
        )
    token = node.settings(request.app).admin_token
    # The routes are mounted only with a token; without one nothing matches.
    expected = token.get_secret_value().encode() if token is not None else None
    if expected is None or not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise Problem(403, "the admin token is not valid for this node", slug="forbidden")


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


async def get_drain(request: Request) -> DrainController:
    return node.drain(request.app)


DrainDep = Annotated[DrainController, Depends(get_drain)]


def _state(drain: DrainController) -> dict[str, Any]:
    return {
        "state": str(drain.lifecycle.state),
        "drained_by": sorted(drain.sources),
        "stopping": drain.stop_requested,
    }


@router.post("/drain", summary="Take this node out of rotation")
async def drain_node(drain: DrainDep) -> dict[str, Any]:
    """Readiness and the agent flip at once; requests are still served (with
    `Connection: close`) until the node is undrained or stopped."""
    drain.drain(ADMIN)
    return _state(drain)


@router.post("/undrain", summary="Put this node back into rotation")
async def undrain_node(drain: DrainDep) -> dict[str, Any]:
    """409 while the node is stopping or the drain file still holds it."""
    try:
        drain.undrain(ADMIN)
    except CannotUndrain as exc:
        raise Problem(409, str(exc), slug="cannot-undrain", **_state(drain)) from None
    return _state(drain)
