"""Reading the fields of a client's request: one parser per kind of field, one set of limits.

Slicer and OHIF send JSON, but some fields arrive as text (MONAI Label's form fields, `--conf` strings), so each
parser takes either. A field that cannot be read is a 400 that names it and says what was expected.
"""

from __future__ import annotations

import json
import math

import numpy as np

from lib.core.errors import bad_request

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
LABEL_VALUE_RANGE = (1, 65535)  # a label map's voxel value: 0 is background; uint16 is the widest result type


def parse_flag(value) -> bool:
    """A yes/no value: a bool, or its text ("true"/"false", "1"/"0", "yes"/"no", "on"/"off"; empty is no).
    Raises ValueError otherwise; `flag` is the request-field form."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def flag(request: dict, name: str, default: bool = False) -> bool:
    value = request.get(name, default)
    if value is None:
        return default
    try:
        return parse_flag(value)
    except ValueError as e:
        raise bad_request(f"'{name}' must be true or false, got {value!r}") from e


def number(request: dict, name: str, default=None, low: float | None = None, high: float | None = None,
           cast=float):
    """request[name] as `cast` (int or float) within [low, high]; `default` when absent or empty."""
    value = request.get(name, default)
    if value is None or value == "":
        if default is None:
            raise bad_request(f"'{name}' is required")
        value = default
    kind = "an integer" if cast is int else "a number"
    if isinstance(value, bool):
        raise bad_request(f"'{name}' must be {kind}, got {value!r}")
    try:
        if cast is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        result = cast(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise bad_request(f"'{name}' must be {kind}, got {value!r}") from e
    if cast is float and not math.isfinite(result):
        raise bad_request(f"'{name}' must be a finite number, got {value!r}")
    if (low is not None and result < low) or (high is not None and result > high):
        show = str if cast is int else (lambda v: f"{v:g}")
        bounds = (f"between {show(low)} and {show(high)}" if low is not None and high is not None
                  else f"at least {show(low)}" if low is not None else f"at most {show(high)}")
        raise bad_request(f"'{name}' must be {bounds}, got {show(result)}")
    return result


def integer(request: dict, name: str, default=None, low: int | None = None, high: int | None = None) -> int:
    return number(request, name, default, low, high, int)


def label_value(request: dict, default: int = 1) -> int:
    """The voxel value of the label a request answers or trains."""
    return integer(request, "label_value", default, *LABEL_VALUE_RANGE)


def is_finite_number(value) -> bool:
    """An int or float that is not a bool, NaN or infinite (JSON from some clients carries NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_list(value, name: str) -> list:
    """A list field, given as a list or as its JSON text; absent or empty is []."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise bad_request(f"'{name}' is not valid JSON: {e}") from e
    if not isinstance(value, (list, tuple)):
        raise bad_request(f"'{name}' must be a list, got {type(value).__name__}")
    return list(value)


def points(request: dict, name: str, ndim: int) -> np.ndarray:
    """A list of voxel points (`foreground`, `background`) as an (N, ndim) array; extra coordinates are ignored."""
    out = []
    for p in as_list(request.get(name), name):
        if (not isinstance(p, (list, tuple)) or len(p) < ndim
                or not all(is_finite_number(v) for v in p)):
            raise bad_request(f"'{name}' point {p!r} must be a list of {ndim} voxel coordinates")
        out.append([float(v) for v in p[:ndim]])
    return np.asarray(out, dtype=np.float64).reshape(-1, ndim)


def optional_index(request: dict, name: str) -> int | None:
    """An optional integer index (`slice`, `axis`): None when absent; Slicer sends slice -1 for "not given",
    any other negative index is a 400."""
    value = request.get(name)
    if value is None or value == "" or (name == "slice" and not isinstance(value, bool) and value == -1):
        return None
    return integer(request, name, low=0)
