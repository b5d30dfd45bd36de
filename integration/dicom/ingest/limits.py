"""Size limits on what a peer sends: one instance, and what a deflated data set inflates to.

A deflated data set (transfer syntax 1.2.840.10008.1.2.1.99) of a few megabytes can inflate to
gigabytes. :func:`inflate_within` measures the inflated size first, a chunk at a time (memory stays
at one chunk), and inflates for real only what fits ``max_bytes``: a deflate bomb costs CPU for a
moment, never memory. Every inflate of peer bytes in MedBridge goes through here.
"""

from __future__ import annotations

import zlib

_CHUNK = 1 << 20


class InstanceTooLargeError(ValueError):
    """An instance (or what its deflated data set inflates to) exceeds the configured maximum."""

    def __init__(self, size_description: str, max_bytes: int) -> None:
        super().__init__(f"the instance {size_description} exceeds MEDBRIDGE_DICOM_MAX_INSTANCE_BYTES "
                         f"({max_bytes} bytes)")
        self.max_bytes = max_bytes


TOO_LARGE_COMMENT = "Instance exceeds the receiver's maximum instance size"  # 64 characters at most


def inflated_size_within(data: bytes | memoryview, max_bytes: int) -> int:
    """The size ``data`` (raw deflate, RFC 1951, as PS3.5 A.5 has it) inflates to, measured without
    holding it; raises :class:`InstanceTooLargeError` as soon as it passes ``max_bytes`` and
    ``zlib.error`` when ``data`` is not a deflate stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending: bytes | memoryview = data
    while True:
        total += len(inflater.decompress(pending, _CHUNK))
        if total > max_bytes:
            raise InstanceTooLargeError("inflated", max_bytes)
        pending = inflater.unconsumed_tail
        if not pending:
            break
    total += len(inflater.flush())
    if total > max_bytes:
        raise InstanceTooLargeError("inflated", max_bytes)
    return total


def inflate_within(data: bytes | memoryview, max_bytes: int) -> bytes:
    """``data`` inflated, if that fits in ``max_bytes`` (see :func:`inflated_size_within`)."""
    inflated_size_within(data, max_bytes)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = inflater.decompress(data, max_bytes + 1)
    if inflater.unconsumed_tail or len(out) > max_bytes:
        raise InstanceTooLargeError("inflated", max_bytes)
    return out + inflater.flush()


def part10_data_set_offset(part10: bytes) -> int:
    """Where the data set begins in a Part 10 file (after the preamble and the File Meta Information,
    whose group length element comes first); ValueError when there is no such header."""
    if len(part10) < 144 or part10[128:132] != b"DICM" or part10[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a DICOM Part 10 file with a File Meta Information group length")
    return 144 + int.from_bytes(part10[140:144], "little")


DEFLATED = "1.2.840.10008.1.2.1.99"
_TRANSFER_SYNTAX_TAG = b"\x02\x00\x10\x00UI"


def check_part10(part10: bytes, max_bytes: int) -> None:
    """Raise :class:`InstanceTooLargeError` when a Part 10 file exceeds ``max_bytes``, as it is or,
    in the deflated transfer syntax, inflated (measured without inflating it into memory). Files
    without a readable header pass: the parser refuses them later."""
    if len(part10) > max_bytes:
        raise InstanceTooLargeError(f"of {len(part10)} bytes", max_bytes)
    try:
        offset = part10_data_set_offset(part10)
    except ValueError:
        return
    meta = part10[132:offset]
    at = meta.find(_TRANSFER_SYNTAX_TAG)
    if at < 0:
        return
    length = int.from_bytes(meta[at + 6 : at + 8], "little")
    syntax = meta[at + 8 : at + 8 + length].rstrip(b"\x00 ").decode("ascii", "replace")
    if syntax == DEFLATED:
        try:
            inflated_size_within(memoryview(part10)[offset:], max_bytes)
        except zlib.error:
            return  # not a deflate stream: the parser refuses it
