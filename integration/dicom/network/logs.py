"""Log hygiene for pynetdicom and pydicom: what a peer sent never reaches a log.

For a PDU it cannot decode pynetdicom logs an ERROR with the exception, whose text and traceback
may quote the received bytes; at DEBUG it dumps every PDU in hex and every data set element by
element. Either is patient data in the log. :func:`install_log_hygiene` filters every record of
those libraries: DEBUG records are dropped, an exception is reduced to its type, and a message that
still looks like bytes (a hex dump, a ``b'...'`` literal, escaped bytes) is replaced by a line that
says it was withheld. The one-line reasons ("Unable to decode the received PDU data") stay.
"""

from __future__ import annotations

import logging
import re
import warnings

_LIBRARIES = ("pynetdicom", "pydicom")
# 8+ two-digit hex groups ("01 00 00 00 ..."), a bytes literal, or escaped bytes
_BYTES_LIKE = re.compile(r"(?:\b[0-9A-Fa-f]{2}[ :]){8,}|\bb'|\bb\"|\\x[0-9A-Fa-f]{2}|bytearray\(")
WITHHELD = "[message withheld: it may quote bytes a peer sent]"


class PeerBytesFilter(logging.Filter):
    """Drops or rewrites a record of pynetdicom/pydicom that could carry received bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return False  # PDU hex dumps and data set listings live here
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg = f"{type(exc).__name__ if exc is not None else 'exception'} (details withheld: they may " \
                         "quote bytes a peer sent)"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a message that cannot be formatted is not logged as is
            message = WITHHELD
        if message is WITHHELD or _BYTES_LIKE.search(message) or "\n" in message:
            record.msg, record.args = WITHHELD, None
        return True


_FILTER = PeerBytesFilter()


def install_log_hygiene() -> None:
    """Attach the filter to every pynetdicom and pydicom logger that exists (they are made when
    their modules are imported, so call this after importing pynetdicom; calling again is harmless)."""
    # pydicom quotes a malformed value ("Invalid value for VR UI: '<the UID>'") as a warning: the value
    # is the data set's; the listener processes have no `medbridge` command line to set this for them
    logging.getLogger("pydicom").setLevel(max(logging.ERROR, logging.getLogger("pydicom").level))
    warnings.filterwarnings("ignore", message=r"Invalid value for VR", category=UserWarning)
    names = [name for name in list(logging.root.manager.loggerDict)
             if name.split(".")[0] in _LIBRARIES]
    for name in (*_LIBRARIES, *names):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
