"""MONAI Label's FastAPI app, made fit for a shared server: inference off the event loop with jobs, inputs checked
before MONAI Label's handlers see them, and errors raised in those handlers answered as the 4xx they are."""

from __future__ import annotations

import json
import logging
import re

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from monailabel.endpoints import activelearning, datastore, infer, logs, ohif, session
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException, MONAILabelError, \
    MONAILabelException
from monailabel.interfaces.utils.app import app_instance

from lib.server import endpoints, inference
from lib.server import ohif as ohif_viewer

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
    logger.error(f"{request.method} {request.url.path}: {e.error}: {message}")
    return _answer(500, f"{e.error.value}: {message}")


async def _not_json(request: Request, e: json.JSONDecodeError):
    return _answer(400, f"a JSON field of this request is not JSON: {e}")


async def _too_large(request: Request, e: OverflowError):
    return _answer(400, f"a number in this request is too large: {e}")


# (method, path pattern, which names the name must be one of): MONAI Label's handlers start a training
# subprocess or look up a file before they find out that the name is unknown.
NAMED = [
    ("POST", re.compile(r"/train/(?P<name>[^/]+)/?"), "trainers"),
    ("POST", re.compile(r"/batch/infer/(?P<name>[^/]+)/?"), "infers"),
    (None, re.compile(r"/model/(?:info/)?(?P<name>[^/]+)/?"), "models"),
    (None, re.compile(r"/scoring/(?P<name>[^/]+)/?"), "scoring"),
]
NO_WSI = re.compile(r"/infer/wsi(?:_v2)?/[^/]+/?")


def _refusal(method: str, path: str) -> tuple[int, str] | None:
    if NO_WSI.fullmatch(path):
        return 404, "this server has no whole-slide (WSI) models"
    for wanted, pattern, kind in NAMED:
        match = pattern.fullmatch(path)
        if match and (wanted is None or method == wanted):
            instance = app_instance()
            known = {"trainers": instance._trainers, "infers": instance._infers, "scoring": instance._scoring_methods,
                     "models": {**instance._infers, **instance._trainers}}[kind]
            name = match["name"]
            if name not in known:
                return 404, f"no {kind.rstrip('s')} {name[:80]!r}; this server has: {', '.join(sorted(known))}"
            if kind == "models" and method in ("PUT", "DELETE") and not instance.model_file(name, validate=False):
                return 404, f"{name!r} has no weights file to replace over HTTP; its weights are set in configs/app.yaml"
    return None


class RefuseUnknownNames:
    """ASGI middleware: 404 for an unknown model, trainer or scoring method before MONAI Label's handler runs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = _refusal(scope["method"], scope["path"])
            if refusal:
                await _answer(*refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def override(app: FastAPI, originals: list[APIRouter], router: APIRouter) -> None:
    """Serve `router`'s routes instead of MONAI Label's for the same path and method (Slicer and OHIF keep
    calling them): routes match in order, so ours go first, and MONAI Label's leave the OpenAPI schema."""
    ours = {(r.path, m) for r in router.routes for m in r.methods}
    for original in originals:
        for route in original.routes:
            if any((original.prefix + route.path, m) in ours for m in route.methods):
                route.include_in_schema = False
    app.include_router(router)
    app.router.routes.insert(0, app.router.routes.pop())


def serve(app: FastAPI) -> FastAPI:
    override(app, [infer.router], inference.router)
    override(app, [datastore.router, session.router, logs.router, activelearning.router], endpoints.router)
    override(app, [ohif.router], ohif_viewer.router)
    ohif_viewer.panel_bundle()  # fail at start if the pinned wheel's panel is not the one patched
    app.add_middleware(RefuseUnknownNames)
    app.add_exception_handler(MONAILabelException, _monailabel_error)
    app.add_exception_handler(json.JSONDecodeError, _not_json)
    app.add_exception_handler(OverflowError, _too_large)
    app.openapi_schema = None
    return app
