"""Child processes die with the runtime.

A child started in a session of its own (so that Ctrl-C reaches the runtime alone, which then stops
it in order) survives a SIGKILL of the runtime, and keeps its port: the next start finds the port
taken. On Linux the kernel can send the child a signal when its parent dies (``PR_SET_PDEATHSIG``);
:func:`die_with_parent` asks for SIGKILL. Elsewhere it does nothing (the pid file of
:mod:`integration.events.embedded` still lets a restart replace its own orphan broker).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    Call it first thing in a child's entry point (a ``multiprocessing`` spawn child, such as the DICOM
    listener processes, with ``parent_pid=multiprocessing.parent_process().pid``); for a subprocess use
    :func:`die_with_parent_of`. ``parent_pid``, when given, closes the race where the parent died before
    the call: the child then kills itself at once."""
    prctl = _prctl()
    if prctl is not None:
        _ask_for_sigkill(prctl, parent_pid)


def die_with_parent_of(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child dies with ``parent_pid`` (this process).
    libc is looked up here, in the parent: between fork and exec the child does only the system call."""
    prctl = _prctl()

    def preexec() -> None:
        if prctl is not None:
            _ask_for_sigkill(prctl, parent_pid)

    return preexec


def _ask_for_sigkill(prctl: Callable[..., int], parent_pid: int | None) -> None:
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not fatal: the orphan check of the next start remains
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
