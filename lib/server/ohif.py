"""OHIF v3 as the monailabel wheel ships it (`/ohif/`), with three changes to its MONAI Label panel, made to the
shipped bundle when it is served (the wheel's files stay untouched; a wheel whose panel lacks a changed line fails
the server's start, not a clinician's click):

- **Submit Label.** The 0.8.5 panel lost its Submit Label button (MONAI Label PR #1787; issue #1805: no way to save
  a DICOM SEG from OHIF). It is back in the Active Learning tab: it sends the viewer's labelmap with its segments'
  names and indices through the panel's own `save_label` (`PUT /datastore/label`, `label.bin`), which the server
  stores as a DICOM SEG on the PACS.
- **The server address** defaults to the page's own origin: the panel guessed `http://HOST:8000/`, which fails on
  any other port or behind a proxy. A saved address (the panel's cookie) still wins.
- Files in sub-folders of the bundle (`assets/...`) are served; MONAI Label's route answered them with index.html.
"""

from __future__ import annotations

import functools
import os

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse, Response
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import get_mime_type

from lib.server.paths import inside

OHIF_DIR = os.path.join(os.path.dirname(os.path.realpath(__import__("monailabel").__file__)), "endpoints", "static",
                        "ohif")
PANEL_MARK = "class OptionTable extends BaseTab"

SUBMIT_HANDLER = r"""
    this.onClickSubmitLabel = async () => {
      const segmentationService = this.props.servicesManager.services.segmentationService;
      const volume = segmentationService.getLabelmapVolume('1');
      const viewport = this.props.getActiveViewportInfo();
      if (!volume || !viewport || !viewport.displaySet) {
        this.notification.show({ title: 'MONAI Label', message: 'Nothing to submit: run a model first',
          type: 'warning', duration: 5000 });
        return;
      }
      const scalars = volume.voxelManager.getCompleteScalarDataArray();
      const labelmap = new Uint8Array(scalars.length);
      labelmap.set(scalars);
      const segments = currentSegmentsInfo(segmentationService).info;
      const label_info = Object.keys(segments).filter(name => name !== 'background')
        .map(name => ({ name: name, idx: segments[name].segmentIndex,
                        color: segments[name].color ? segments[name].color.slice(0, 3) : undefined }))
        .sort((a, b) => a.idx - b.idx);
      const nid = this.notification.show({ title: 'MONAI Label', message: 'Submitting the label',
        type: 'info', duration: 60000 });
      const response = await this.props.client().save_label(viewport.displaySet.SeriesInstanceUID,
        new Blob([labelmap], { type: 'application/octet-stream' }), { label_info: label_info });
      this.notification.hide(nid);
      this.notification.show({ title: 'MONAI Label',
        message: response.status === 200 ? 'Label submitted: saved on the PACS'
                                         : 'Failed to save the label (HTTP ' + response.status + ')',
        type: response.status === 200 ? 'success' : 'error', duration: 5000 });
    };
"""

SUBMIT_BUTTON = (""", /*#__PURE__*/react.createElement("td", null, "\\xA0"), /*#__PURE__*/react.createElement("td", """
                 """null, /*#__PURE__*/react.createElement("button", { className: "actionInput", """
                 """style: { backgroundColor: 'lightgray' }, title: "Submit Label", """
                 """onClick: this.onClickSubmitLabel }, "Submit Label"))""")

# (what the shipped panel says, what it says here): each must occur exactly once in the panel's chunk.
CHANGES = [
    ("""    this.state = {
      strategy: 'random',""", SUBMIT_HANDLER + """    this.state = {
      strategy: 'random',"""),
    ("""}, this.state.training ? 'Stop Training' : 'Update Model'))""",
     """}, this.state.training ? 'Stop Training' : 'Update Model'))""" + SUBMIT_BUTTON),
    ("""      ref: this.actions['activelearning'],""",
     """      ref: this.actions['activelearning'],
      servicesManager: this.props.servicesManager,"""),
    ("""'http://' + window.location.host.split(':')[0] + ':8000/'""", """window.location.origin + '/'"""),
]


@functools.lru_cache(maxsize=1)
def panel_bundle() -> tuple[str, str]:
    """(file name, patched text) of the chunk that holds the MONAI Label panel."""
    for name in sorted(os.listdir(OHIF_DIR)):
        if not name.endswith(".js"):
            continue
        with open(os.path.join(OHIF_DIR, name), encoding="utf-8") as f:
            text = f.read()
        if PANEL_MARK not in text:
            continue
        for old, new in CHANGES:
            if text.count(old) != 1:
                raise RuntimeError(f"OHIF bundle {name}: the MONAI Label panel is not the one this server patches "
                                   f"(monailabel is pinned in requirements.txt); missing: {old.strip()[:60]!r}")
            text = text.replace(old, new)
        return name, text
    raise RuntimeError(f"no MONAI Label panel in the OHIF bundle at {OHIF_DIR}")


router = APIRouter()


@router.get("/ohif/{path:path}", include_in_schema=False)
def ohif_file(path: str = "", user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    panel, text = panel_bundle()
    if path == panel:
        return Response(text, media_type="application/javascript")
    file = os.path.join(OHIF_DIR, path)
    if not path or not inside(OHIF_DIR, file) or not os.path.isfile(file):
        file = os.path.join(OHIF_DIR, "index.html")  # the viewer's own routes (/ohif/monai-label?...)
    if not os.path.isfile(file):
        raise HTTPException(404, "OHIF is not installed (the monailabel wheel ships it)")
    return FileResponse(file, media_type=get_mime_type(file))
