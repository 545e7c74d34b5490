"""FastAPI dependencies, as Annotated aliases, in one place."""

from typing import Annotated

from fastapi import Depends, Request

from swamp_app.runtime import AppRuntime


def get_runtime(request: Request) -> AppRuntime:
    runtime: AppRuntime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[AppRuntime, Depends(get_runtime)]
