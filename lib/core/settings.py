"""The app's settings: configs/app.yaml, overridden by MONAI Label's `--conf KEY VALUE` strings."""

from __future__ import annotations

import os

import yaml

from lib.core.requests import parse_flag

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_SETTINGS_FILE = os.path.join(REPO_ROOT, "configs", "app.yaml")


def load_settings(conf: dict | None = None, path: str = DEFAULT_SETTINGS_FILE) -> dict:
    with open(path) as f:
        settings = yaml.safe_load(f) or {}
    for key, value in (conf or {}).items():
        if key in settings and isinstance(value, str):
            default = settings[key]
            try:
                if isinstance(default, bool):
                    value = parse_flag(value)
                elif isinstance(default, int):
                    value = int(value)
            except ValueError as e:
                raise ValueError(f"--conf {key} {value!r}: {e}") from e
        settings[key] = value
    return settings


def resolve_path(path: str, base: str) -> str:
    return path if not path or os.path.isabs(path) or "://" in path else os.path.join(base, path)
