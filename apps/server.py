"""The ASGI app the server runs (`monailabel start_server ... --uvicorn_app apps.server:app`): MONAI Label's,
with inference off the event loop as jobs, and every error a 4xx/5xx with a reason (lib/server)."""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# MONAI Label drops every imported `lib.*` module when it loads an app (for apps that ship their own `lib`). The
# server's code below and the app share lib/: a second copy of it would be a second job table and device queue.
os.environ.setdefault("MONAI_LABEL_RELOAD_APP_LIB", "false")

from monailabel.app import app as monailabel_app  # noqa: E402

from lib.server.app import serve  # noqa: E402

app = serve(monailabel_app)
