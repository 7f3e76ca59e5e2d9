"""Strided row copies between buffers: the copy rung's copy of a guest's frame into our dumb buffer,
QEMU's pixel updates into our surface, the slate and capture's reads.

The copy is `kms_copy_rows` of native/kms_helpers.c, which checks every row against the lengths of
both buffers before it copies a byte (the layouts come from guests, and the daemon runs as root).
It replaced a numpy strided copy: numpy cost the daemon a third of its import time for that one
operation (bench/bench_copy.py compares the two and a pure-Python copy).

`native=False` is the pure-Python copy, a memoryview slice per row with the same checks: what
`directflip run --pure-python` uses, so that the bench's Python path has no C in it at all.
"""

from __future__ import annotations

import errno
import os

from compositor._native import ffi, lib

_SIZE_LIMIT = 1 << 64  # the C side takes size_t; larger values cannot describe a buffer anyway


def rows_error(length: int, offset: int, pitch: int, height: int, row_bytes: int) -> int:
    """0 when `height` rows of `row_bytes` bytes, `pitch` apart from byte `offset`, lie within
    `length` bytes; else the errno kms_copy_rows answers (ERANGE: outside the buffer, EINVAL: rows
    that overlap). Python integers do not overflow, so this is the plain sum."""
    if min(offset, pitch, height, row_bytes) < 0 or offset > length:
        return errno.ERANGE
    if height == 0 or row_bytes == 0:
        return 0
    if height > 1 and pitch < row_bytes:
        return errno.EINVAL
    return errno.ERANGE if offset + pitch * (height - 1) + row_bytes > length else 0


class CopyRefused(OSError, ValueError):
    """A copy kms_copy_rows (or the Python copy) refused: an OSError with its errno (ERANGE, EINVAL),
    and a ValueError because what is refused is a layout, as a BadPlane is, so whichever of the two a
    caller catches (the ladder both, the QEMU source OSError) takes it. As io.UnsupportedOperation."""


def copy_rows(dst, dst_offset: int, dst_pitch: int, src, src_offset: int, src_pitch: int, height: int,
              row_bytes: int, *, native: bool = True) -> None:
    """Copy `height` rows of `row_bytes` bytes: row i from byte src_offset + i * src_pitch of `src`
    to byte dst_offset + i * dst_pitch of `dst`. `dst` is a writable buffer (mmap, bytearray), `src`
    any buffer (mmap, bytes, bytearray). A copy that would touch a byte outside either buffer (or
    whose rows would overlap) raises CopyRefused (ERANGE, EINVAL) and copies nothing, as does a
    value below 0 or from 2**64 on (ERANGE, checked first); a read-only `dst` raises BufferError.
    Neither buffer is held once it returns or raises: the caller may close an mmap in its `finally`,
    which an export kept alive by the traceback would forbid."""
    values = (dst_offset, dst_pitch, src_offset, src_pitch, height, row_bytes)
    if any(v < 0 or v >= _SIZE_LIMIT for v in values):   # refused first, whatever the buffers
        raise CopyRefused(errno.ERANGE, f"{os.strerror(errno.ERANGE)}: copy of {height} x {row_bytes} bytes "
                          f"refused: offsets, pitches, height and row bytes must lie in 0..2**64-1")
    if native:
        # from_buffer holds each buffer (an mmap cannot be closed, a bytearray not resized) for the
        # call, and its length is that of the memory it points at; `with` lets go of them before any
        # exception is raised.
        with ffi.from_buffer(dst, require_writable=True) as to, ffi.from_buffer(src) as frm:
            dst_len, src_len = len(to), len(frm)
            err = -lib.kms_copy_rows(to, dst_len, dst_offset, dst_pitch, frm, src_len, src_offset, src_pitch,
                                     height, row_bytes)
    else:
        dst_len, src_len, err = _copy_rows_python(dst, dst_offset, dst_pitch, src, src_offset, src_pitch,
                                                  height, row_bytes)
    if err:
        raise _refusal(err, dst_len, dst_offset, dst_pitch, src_len, src_offset, src_pitch, height, row_bytes)


def _copy_rows_python(dst, dst_offset: int, dst_pitch: int, src, src_offset: int, src_pitch: int,
                      height: int, row_bytes: int) -> tuple[int, int, int]:
    """The pure-Python copy, a memoryview slice per row, checked as kms_copy_rows checks:
    (destination length, source length, errno or 0)."""
    with memoryview(dst) as whole_dst, memoryview(src) as whole_src, \
            whole_dst.cast("B") as to, whole_src.cast("B") as frm:
        if to.readonly:
            raise BufferError("Object is not writable.")  # what from_buffer says on the native path
        err = (rows_error(len(to), dst_offset, dst_pitch, height, row_bytes)
               or rows_error(len(frm), src_offset, src_pitch, height, row_bytes))
        if not err and row_bytes:  # rows of 0 bytes: nothing to do, however many (height may be 2**63)
            d, s = dst_offset, src_offset
            for _ in range(height):
                to[d:d + row_bytes] = frm[s:s + row_bytes]
                d += dst_pitch
                s += src_pitch
        return len(to), len(frm), err


def _refusal(err: int, dst_len: int, dst_offset: int, dst_pitch: int, src_len: int, src_offset: int,
             src_pitch: int, height: int, row_bytes: int) -> CopyRefused:
    """The exception for a refused copy, naming the first side whose rows do not fit (the
    destination is checked first, as in the C)."""
    sides = (("destination", dst_len, dst_offset, dst_pitch), ("source", src_len, src_offset, src_pitch))
    bad = next((side for side in sides if rows_error(side[1], side[2], side[3], height, row_bytes)), None)
    what = f"copy of {height} x {row_bytes} bytes refused"
    if bad is not None:
        name, length, offset, pitch = bad
        what += f": rows from offset {offset}, {pitch} bytes apart, do not fit the {name}'s {length} bytes"
    return CopyRefused(err, f"{os.strerror(err)}: {what}")


__all__ = ["CopyRefused", "copy_rows", "rows_error"]
