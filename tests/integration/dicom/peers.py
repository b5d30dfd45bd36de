"""dcmtk as the requestor where a test needs to see how an association request was answered.

pynetdicom's requestor races with a quick rejection: when its DUL thread has read the
A-ASSOCIATE-RJ and closed the socket before the calling thread checks that the socket is
connected, ``ae.associate`` returns an association that is aborted, not rejected, after its
network timeout (seen under load in CI). dcmtk's echoscu reads the answer on one thread.
"""

from __future__ import annotations

import subprocess


def echo_answer(port: int, calling_ae: str = "ECHOSCU", called_ae: str = "MEDBRIDGE") -> str:
    """What dcmtk's echoscu printed for a C-ECHO association to 127.0.0.1:``port`` (stdout and stderr)."""
    proc = subprocess.run(["echoscu", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def is_rejected_transient(answer: str) -> bool:
    """echoscu's report of an A-ASSOCIATE-RJ, result "rejected transient", reason "local limit exceeded"."""
    return "Rejected Transient" in answer and "Local Limit Exceeded" in answer.title()
