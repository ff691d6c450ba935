"""HTTP byte ranges (RFC 9110 §14) for downloads: one range per request, which is what
download tools and resuming clients send. A multi-range request gets the whole body."""

from __future__ import annotations

import re

from fastapi import HTTPException

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.ASCII)
#: No file is this large: a position with more digits is read as "beyond the end" (never
#: converted: Python refuses int() of more than 4300 digits).
MAX_DIGITS = 18
BEYOND = 10**MAX_DIGITS


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= MAX_DIGITS else BEYOND


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) for a ``Range`` header, None for the whole body.

    Raises a 416 for a range that starts past the end (however many digits it has).
    Syntactically invalid or multi-range headers are ignored (the whole body is sent), as
    RFC 9110 allows.
    """
    if not header:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":  # a suffix: the last N bytes
        n = _position(last)
        if n == 0:
            raise _unsatisfiable(size)
        return max(size - n, 0), size
    start = _position(first)
    end = size if last == "" else min(_position(last) + 1, size)
    if start >= size or end <= start:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> HTTPException:
    return HTTPException(416, f"the range is outside the file ({size} bytes): ask for bytes 0-{size - 1}",
                         headers={"Content-Range": f"bytes */{size}"})


def range_applies(if_range: str | None, etag: str) -> bool:
    """An ``If-Range`` header (an ETag) that does not match means: send everything."""
    return if_range is None or if_range.strip() == etag
