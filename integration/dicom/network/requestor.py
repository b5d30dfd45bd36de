"""Adaptations of pynetdicom's requests (``send_c_*``) that MedBridge's DICOM edges need, installed
once per process by :func:`adapt_requests` wherever MedBridge sends DICOM (SR/SC export, C-GET and
C-MOVE sub-operations).

**A requestor race that fast peers expose** (pydicom/pynetdicom#875, still in 3.0.4, the latest).
``send_c_store`` and the other ``send_c_*`` pause the association's reactor thread, but trust an
``_is_paused`` flag left from the previous request; a response that arrives within ~1 ms can then be
taken by the reactor ("Received unexpected C-STORE service message"), and the request waits out its
DIMSE timeout: an export retried, a C-MOVE sub-operation failed. Each request now waits until the
reactor has really paused; the request itself is pynetdicom's, unchanged.

**Instances stored compressed, to a peer that accepted only uncompressed syntaxes** for their SOP
class (a viewer's getscu, a PACS that decodes nothing): MedBridge stores the bytes as received, so a
C-GET or C-MOVE would fail that sub-operation. ``send_c_store`` then decompresses the data set
(pydicom with the declared pylibjpeg/openjpeg/RLE decoders; same SOP Instance UID, PS3.5 Annex A:
a transfer syntax is an encoding, not a new instance) and sends it as explicit (else implicit) VR
little endian. Nothing is ever compressed: a peer that accepted only another compressed syntax gets
the failure it asked for.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association

from integration.phi import uid_hash

log = logging.getLogger(__name__)

_REQUESTS = ("send_c_store", "send_c_echo", "send_c_find", "send_c_get", "send_c_move")
_PAUSE_WAIT_SECONDS = 1.0  # a reactor that has ended never pauses


def adapt_requests() -> None:
    """Wrap pynetdicom's requests (once per process; idempotent)."""
    if getattr(Association, "_medbridge_adapted", False):
        return
    for name in _REQUESTS:
        setattr(Association, name, _paused_first(getattr(Association, name)))
    Association.send_c_store = _uncompressed_where_not_accepted(Association.send_c_store)  # type: ignore[method-assign]
    Association._medbridge_adapted = True  # type: ignore[attr-defined]


def _paused_first(send: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(send)
    def request(self: Association, *args: Any, **kwargs: Any) -> Any:
        if not self.is_requestor:  # an acceptor's requests (C-GET sub-operations) run on its reactor
            return send(self, *args, **kwargs)
        self._reactor_checkpoint.clear()
        self._is_paused = False  # the stale value is the race: the reactor sets it again once it waits
        deadline = time.monotonic() + _PAUSE_WAIT_SECONDS
        while not self._is_paused and time.monotonic() < deadline:
            time.sleep(0.0001)
        try:
            return send(self, *args, **kwargs)
        except BaseException:
            self._reactor_checkpoint.set()  # refused before sending (a file it cannot read): resume
            raise

    return request


def _uncompressed_where_not_accepted(send: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(send)
    def request(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(dataset, Dataset):
            dataset = _as_accepted(self, dataset)
        return send(self, dataset, *args, **kwargs)

    return request


def _as_accepted(assoc: Association, ds: Dataset) -> Dataset:
    """``ds`` decompressed where the peer accepted no context for its compressed transfer syntax but
    an uncompressed one; otherwise as it is (pynetdicom reports what it cannot send)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta or "SOPClassUID" not in ds:
        return ds
    syntax = UID(meta.TransferSyntaxUID)
    if not syntax.is_compressed:
        return ds
    accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID}
    target = next((ts for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if ts in accepted), None)
    if syntax in accepted or target is None:
        return ds
    try:
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:  # noqa: BLE001 - any decoder failure: sent as stored, and refused by pynetdicom
        log.warning("instance %s could not be decompressed for a peer that takes only uncompressed data (%s)",
                    uid_hash(str(ds.get("SOPInstanceUID", ""))), type(exc).__name__)
        return ds
    ds.file_meta.TransferSyntaxUID = target
    return ds
