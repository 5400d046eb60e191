"""The app's settings: configs/app.yaml, overridden by MONAI Label's `--conf KEY VALUE` strings."""

from __future__ import annotations

import os

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_SETTINGS_FILE = os.path.join(REPO_ROOT, "configs", "app.yaml")


def load_settings(conf: dict | None = None, path: str = DEFAULT_SETTINGS_FILE) -> dict:
    with open(path) as f:
        settings = yaml.safe_load(f) or {}
    for key, value in (conf or {}).items():
        if key in settings and isinstance(value, str):
            default = settings[key]
            if isinstance(default, bool):
                value = value.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                value = int(value)
        settings[key] = value
    return settings


def resolve_path(path: str, base: str) -> str:
    return path if not path or os.path.isabs(path) or "://" in path else os.path.join(base, path)
