"""MedBridge's DICOM requests (SR/SC export, C-MOVE sub-operations) go through pynetdicom's requestor,
which has a race that fast peers expose: pydicom/pynetdicom#875, still in 3.0.4 (the latest).

``send_c_store`` and the other ``send_c_*`` pause the association's reactor thread, but trust an
``_is_paused`` flag left from the previous request; a response that arrives within ~1 ms can then be
taken by the reactor ("Received unexpected C-STORE service message"), and the request waits out its
DIMSE timeout: an export retried, a C-MOVE sub-operation failed. :func:`wait_for_reactor_pause` makes
each request wait until the reactor has really paused; the request itself is pynetdicom's, unchanged.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from pynetdicom.association import Association

_REQUESTS = ("send_c_store", "send_c_echo", "send_c_find", "send_c_get", "send_c_move")
_PAUSE_WAIT_SECONDS = 1.0  # a reactor that has ended never pauses


def wait_for_reactor_pause() -> None:
    """Wrap pynetdicom's requests (once per process; idempotent)."""
    if getattr(Association, "_medbridge_waits_for_pause", False):
        return
    for name in _REQUESTS:
        setattr(Association, name, _paused_first(getattr(Association, name)))
    Association._medbridge_waits_for_pause = True  # type: ignore[attr-defined]


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
