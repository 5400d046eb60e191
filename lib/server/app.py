"""MONAI Label's FastAPI app, made fit for a shared server: inference off the event loop with jobs, and errors
raised in MONAI Label's own handlers answered as the 4xx they are, with a reason."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from monailabel.interfaces.exception import (ImageNotFoundException, LabelNotFoundException, MONAILabelError,
                                             MONAILabelException)

from monailabel.endpoints import infer as infer_endpoints

from lib.server import inference

logger = logging.getLogger(__name__)


def _answer(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _monailabel_error(request: Request, e: MONAILabelException):
    message = str(e.msg)
    # MONAI Label says "unknown name" with INVALID_INPUT or APP_INIT_ERROR ("... There is no such strategy ...").
    if isinstance(e, (ImageNotFoundException, LabelNotFoundException)) or any(
            words in message.lower() for words in ("there is no", "not found", "not initialized")):
        return _answer(404, message)
    if e.error == MONAILabelError.INVALID_INPUT:
        return _answer(400, message)
    logger.error(f"{request.method} {request.url.path}: {e.error}: {e.msg}")
    return _answer(500, f"{e.error.value}: {message}")


async def _not_json(request: Request, e: json.JSONDecodeError):
    return _answer(400, f"a JSON field of this request is not JSON: {e}")


async def _too_large(request: Request, e: OverflowError):
    return _answer(400, f"a number in this request is too large: {e}")


def replace_route(app: FastAPI, original_router, path: str, method: str, router) -> None:
    """Serve `path` with `router`'s endpoint instead of MONAI Label's (Slicer and OHIF keep calling it): routes
    match in order, so ours goes first, and MONAI Label's leaves the OpenAPI schema."""
    for route in original_router.routes:
        if original_router.prefix + route.path == path and method in route.methods:
            route.include_in_schema = False
    app.include_router(router)
    app.router.routes.insert(0, app.router.routes.pop())


def serve(app: FastAPI) -> FastAPI:
    replace_route(app, infer_endpoints.router, "/infer/{model}", "POST", inference.router)
    app.add_exception_handler(MONAILabelException, _monailabel_error)
    app.add_exception_handler(json.JSONDecodeError, _not_json)
    app.add_exception_handler(OverflowError, _too_large)
    app.openapi_schema = None
    return app
