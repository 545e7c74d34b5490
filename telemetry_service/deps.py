"""FastAPI dependencies, as Annotated aliases, in one place."""

from typing import Annotated

from fastapi import Depends, Request

from telemetry_service.runtime import TelemetryRuntime


def get_runtime(request: Request) -> TelemetryRuntime:
    runtime: TelemetryRuntime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[TelemetryRuntime, Depends(get_runtime)]
