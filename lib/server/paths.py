"""Only the datastore's data: ids, tags and file names from requests never reach outside its folders.

MONAI Label joins request-supplied image ids and label tags into paths (`../escape` wrote outside the studies
folder), reads any absolute `image` path the server can open, and its error messages told whether a path exists.
Requests name images by datastore id, labels by tag; a server path is accepted only where the operator allowed
it (`allow_server_paths`, off by default).
"""

from __future__ import annotations

import os
import re

from lib.core.errors import bad_request

# What an image id, label tag or session id may be: DICOM UIDs, file stems, tags like "final" or "user_2".
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")
# Request fields that name a file: the image, and One-Prompt's doodle/SegLab label volumes (by tag).
PATH_FIELDS = ("image", "seglab_label", "doodle_label")


def check_id(value: str, what: str = "image id") -> str:
    """`value`, if it is a usable id: no separators, no '..', no leading dot, printable; else 400."""
    if not isinstance(value, str) or not SAFE_ID.fullmatch(value) or ".." in value:
        raise bad_request(f"{what} {str(value)[:80]!r} is not valid: use letters, digits, '.', '_', '+', '-' "
                          f"(no '/', '\\' or '..'; at most 200 characters)")
    return value


def check_session_id(value: str) -> str:
    return check_id(value, "session id")


def looks_like_path(value) -> bool:
    return isinstance(value, str) and (os.path.isabs(value) or "/" in value or "\\" in value or ".." in value
                                       or value.startswith("~"))


def check_request_paths(request: dict, allow_server_paths: bool, uploaded_label: bool = False) -> None:
    """400 when a field names a file on the server (unless allowed). `label` is a segment's name, or the
    path MONAI Label gives an uploaded label file: a client may not hand one in as text."""
    for key in PATH_FIELDS:
        value = request.get(key)
        if looks_like_path(value) and not (allow_server_paths and os.path.isabs(value)):
            raise bad_request(f"'{key}' must name a datastore image or a label tag, not a path on the server")
    label = request.get("label")
    if not uploaded_label and looks_like_path(label):
        raise bad_request("'label' is the segment's name; to send a label file, upload it as the 'label' part")


def inside(root: str, path: str) -> bool:
    """Whether `path`, with links resolved, is `root` or lies under it."""
    root, path = os.path.realpath(root), os.path.realpath(path)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
