"""kms_copy_rows (native/kms_helpers.c) and its wrapper compositor.pixelcopy.copy_rows: the strided
copy of the copy rung and of QEMU's pixel updates. The C runs as root on layouts guests choose, so
besides the bytes it copies, every way a row could reach outside either buffer must be refused before
a byte is written, with values chosen to overflow a naive offset + pitch * (height - 1) + row_bytes.

`lib.kms_copy_rows` is called directly where the raw return value (0 or -errno) is the point; the
wrapper is tested for both of its paths (native, and the pure Python of `--pure-python`), which must
agree with each other and with the plain reference below on any shape."""

from __future__ import annotations

import errno
import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compositor._native import ffi, lib
from compositor.pixelcopy import copy_rows

U64_MAX = 2**64 - 1
PATHS = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])


def c_copy(dst: bytearray, dst_offset: int, dst_pitch: int, src, src_offset: int, src_pitch: int,
           height: int, row_bytes: int, *, dst_len: int | None = None, src_len: int | None = None) -> int:
    """kms_copy_rows on Python buffers; the declared lengths default to the buffers' own."""
    return lib.kms_copy_rows(ffi.from_buffer(dst), len(dst) if dst_len is None else dst_len, dst_offset,
                             dst_pitch, ffi.from_buffer(src), len(src) if src_len is None else src_len,
                             src_offset, src_pitch, height, row_bytes)


def reference(dst: bytes, dst_offset: int, dst_pitch: int, src: bytes, src_offset: int, src_pitch: int,
              height: int, row_bytes: int) -> tuple[int, bytes]:
    """(errno or 0, the destination afterwards), from the contract in kms_helpers.h, row by row."""
    def error(length: int, offset: int, pitch: int) -> int:
        if offset > length:
            return errno.ERANGE
        if height == 0 or row_bytes == 0:
            return 0
        if height > 1 and pitch < row_bytes:
            return errno.EINVAL
        return errno.ERANGE if offset + pitch * (height - 1) + row_bytes > length else 0

    if any(not 0 <= v <= U64_MAX for v in (dst_offset, dst_pitch, src_offset, src_pitch, height, row_bytes)):
        return errno.ERANGE, bytes(dst)   # no size_t: refused before the buffers are looked at
    err = error(len(dst), dst_offset, dst_pitch) or error(len(src), src_offset, src_pitch)
    if err:
        return err, bytes(dst)
    out = bytearray(dst)
    for i in range(height if row_bytes else 0):  # 2**63 empty rows pass the checks
        d, s = dst_offset + i * dst_pitch, src_offset + i * src_pitch
        out[d:d + row_bytes] = src[s:s + row_bytes]
    return 0, bytes(out)


SRC = bytes(range(256)) * 4  # every byte says where it came from (modulo 256)

# ------------------------------------------------------------------------------ what it copies


def test_rows_from_an_offset_with_pitches_longer_than_the_rows():
    # 3 rows of 5 bytes: from byte 7 of the source, 16 apart, to byte 2 of the destination, 9 apart.
    # The bytes between rows (the pitches' padding) are left alone on both sides.
    dst = bytearray(b"\xee" * 40)
    assert c_copy(dst, 2, 9, SRC, 7, 16, 3, 5) == 0
    expected = bytearray(b"\xee" * 40)
    expected[2:7], expected[11:16], expected[20:25] = SRC[7:12], SRC[23:28], SRC[39:44]
    assert dst == expected


def test_the_last_row_may_end_exactly_at_each_buffers_end():
    # Source: 4 rows of 6 bytes, pitch 10, from 3: the last row is bytes 33..38 of a 39-byte buffer.
    # Destination: pitch 8, from 2: the last row is bytes 26..31 of a 32-byte buffer.
    src, dst = SRC[:39], bytearray(32)
    assert c_copy(dst, 2, 8, src, 3, 10, 4, 6) == 0
    assert dst[26:32] == src[33:39]
    assert reference(bytes(32), 2, 8, src, 3, 10, 4, 6) == (0, bytes(dst))


def test_rows_as_long_as_the_pitch_are_one_block():
    # Both pitches equal to the row: the C copies one contiguous block (its fast path).
    dst = bytearray(64)
    assert c_copy(dst, 4, 12, SRC, 100, 12, 5, 12) == 0
    assert dst[4:64] == SRC[100:160] and dst[:4] == bytes(4)


def test_an_empty_copy_writes_nothing_and_an_offset_at_the_end_is_allowed():
    dst = bytearray(b"\xee" * 8)
    assert c_copy(dst, 8, 0, SRC[:8], 8, 0, 5, 0) == 0       # rows of 0 bytes
    assert c_copy(dst, 0, 4, SRC[:8], 0, 4, 0, 4) == 0       # 0 rows
    assert dst == b"\xee" * 8


@PATHS
def test_an_empty_copy_of_any_number_of_rows_returns_at_once(native):
    # Rows of 0 bytes fit anywhere, so 2**63 of them pass the checks: neither path may walk them.
    dst = bytearray(b"\xee" * 8)
    copy_rows(dst, 8, 0, SRC[:8], 0, 0, 2**63, 0, native=native)
    assert dst == b"\xee" * 8


@PATHS
def test_the_wrapper_copies_from_mmap_bytes_and_bytearray(native, tmp_path):
    # What the callers hand it: a mapped file (a dma-buf, a sealed memfd), bytes (a D-Bus message), a
    # bytearray (a pread copy of a guest's memfd); the destination an mmap (our dumb buffer).
    path = tmp_path / "buffer"
    path.write_bytes(SRC)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        for src in (mapped, SRC, bytearray(SRC)):
            with mmap.mmap(-1, 4096) as dst:
                copy_rows(dst, 64, 100, src, 10, 50, 3, 20, native=native)
                assert [dst[64 + i * 100:84 + i * 100] for i in range(3)] == \
                    [SRC[10 + i * 50:30 + i * 50] for i in range(3)]


# ------------------------------------------------------------------------------ what it refuses


REFUSED = [
    # (what, dst length, dst offset, dst pitch, src length, src offset, src pitch, height, row bytes, errno)
    ("source offset past its end", 64, 0, 8, 32, 33, 8, 1, 1, errno.ERANGE),
    ("destination offset past its end", 64, 65, 8, 64, 0, 8, 1, 1, errno.ERANGE),
    ("source's last row one byte past its end", 64, 0, 8, 38, 3, 10, 4, 6, errno.ERANGE),
    ("destination's last row one byte past its end", 31, 2, 8, 64, 0, 8, 4, 6, errno.ERANGE),
    ("a row longer than the source", 64, 0, 64, 16, 0, 16, 1, 17, errno.ERANGE),
    ("a row longer than what is left of the destination", 64, 60, 8, 64, 0, 8, 1, 5, errno.ERANGE),
    ("source pitch shorter than a row", 64, 0, 8, 64, 0, 4, 2, 8, errno.EINVAL),
    ("destination pitch shorter than a row", 64, 0, 4, 64, 0, 8, 2, 8, errno.EINVAL),
    ("source pitch 2**63, 3 rows", 64, 0, 8, 64, 0, 2**63, 3, 1, errno.ERANGE),
    ("destination pitch 2**63, 3 rows", 64, 0, 2**63, 64, 0, 8, 3, 1, errno.ERANGE),
    ("source offset 2**64 - 1", 64, 0, 8, 64, U64_MAX, 8, 1, 1, errno.ERANGE),
    ("height 2**63", 64, 0, 2, 64, 0, 2, 2**63, 1, errno.ERANGE),
    ("row bytes 2**64 - 1", 64, 0, U64_MAX, 64, 0, U64_MAX, 1, U64_MAX, errno.ERANGE),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_a_row_outside_either_buffer_is_refused_and_nothing_is_written(case):
    _, dst_len, dst_offset, dst_pitch, src_len, src_offset, src_pitch, height, row, err = case
    dst = bytearray(b"\xee" * dst_len)
    assert c_copy(dst, dst_offset, dst_pitch, SRC[:src_len], src_offset, src_pitch, height, row) == -err
    assert dst == b"\xee" * dst_len
    assert reference(bytes(dst), dst_offset, dst_pitch, SRC[:src_len], src_offset, src_pitch, height,
                     row)[0] == err


@PATHS
@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_the_wrapper_raises_the_errno_and_names_the_side(case, native):
    _, dst_len, dst_offset, dst_pitch, src_len, src_offset, src_pitch, height, row, err = case
    dst = bytearray(b"\xee" * dst_len)
    with pytest.raises(OSError) as info:
        copy_rows(dst, dst_offset, dst_pitch, SRC[:src_len], src_offset, src_pitch, height, row,
                  native=native)
    assert info.value.errno == err
    # The destination is checked first, as in the C: the message names the first side that fails.
    dst_fails = reference(bytes(dst_len), dst_offset, dst_pitch, bytes(dst_len), 0, dst_pitch, height, row)[0]
    side = "destination" if dst_fails else "source"
    assert f"do not fit the {side}'s {dst_len if dst_fails else src_len} bytes" in info.value.strerror
    assert dst == b"\xee" * dst_len


# Values whose sum or product wraps around 2**64 to something small, which a check computing
# offset + pitch * (height - 1) + row_bytes in 64 bits would let through: (what, offset, pitch,
# height, row bytes) for a 64-byte buffer.
WRAPS = [
    ("pitch 2**63, 3 rows: the end wraps to 1", 0, 2**63, 3, 1),
    ("pitch * (height - 1) is exactly 2**64", 0, 2**32, 2**32 + 1, 1),
    ("offset + row wraps to 0", 8, 8, 1, 2**64 - 8),
    ("pitch * (height - 1) + row wraps to 0", 0, 3 * 2**62, 2, 2**62),
    ("height 2**64 - 1 rows of 1 byte", 0, 1, U64_MAX, 1),
    ("pitch 2**64 - 1, 2 rows", 0, U64_MAX, 2, 1),
]


@pytest.mark.parametrize("side", ["source", "destination"])
@pytest.mark.parametrize("case", WRAPS, ids=[c[0] for c in WRAPS])
def test_values_that_wrap_around_are_refused_on_either_side(case, side):
    # The other side is declared as large as a size_t goes, its rows packed from 0 (which fits it:
    # row bytes * height < 2**64 in every case), so the refusal can only come from the side under
    # test. Nothing may be copied: were the check fooled, the copy would run far past both buffers.
    _, offset, pitch, height, row = case
    assert row * height <= U64_MAX
    dst = bytearray(b"\xee" * 64)
    to, frm = ffi.from_buffer(dst), ffi.from_buffer(SRC[:64])
    if side == "source":
        ret = lib.kms_copy_rows(to, U64_MAX, 0, row, frm, 64, offset, pitch, height, row)
    else:
        ret = lib.kms_copy_rows(to, 64, offset, pitch, frm, U64_MAX, 0, row, height, row)
    assert ret == -errno.ERANGE
    assert dst == b"\xee" * 64


def test_the_declared_length_is_what_bounds_the_copy():
    # The C knows only the lengths it is told: a source declared shorter than its memory is refused
    # where its declared end is crossed, however much memory lies behind it.
    dst = bytearray(16)
    assert c_copy(dst, 0, 8, SRC, 0, 8, 2, 8, src_len=15) == -errno.ERANGE
    assert c_copy(dst, 0, 8, SRC, 0, 8, 2, 8, dst_len=15) == -errno.ERANGE
    assert c_copy(dst, 0, 8, SRC, 0, 8, 2, 8, src_len=16) == 0


def test_a_null_buffer_with_a_length_is_refused():
    dst = bytearray(8)
    assert lib.kms_copy_rows(ffi.NULL, 8, 0, 8, ffi.from_buffer(SRC), 8, 0, 8, 1, 8) == -errno.EINVAL
    assert lib.kms_copy_rows(ffi.from_buffer(dst), 8, 0, 8, ffi.NULL, 8, 0, 8, 1, 8) == -errno.EINVAL
    assert lib.kms_copy_rows(ffi.from_buffer(dst), 8, 0, 8, ffi.NULL, 0, 0, 8, 0, 8) == 0


@PATHS
def test_negative_values_and_read_only_destinations_are_refused(native):
    with pytest.raises(OSError) as info:
        copy_rows(bytearray(8), 0, 8, SRC, -1, 8, 1, 8, native=native)
    assert info.value.errno == errno.ERANGE
    with pytest.raises(OSError) as info:
        copy_rows(bytearray(8), 0, 8, SRC, 0, 8, 1, 2**64, native=native)
    assert info.value.errno == errno.ERANGE
    with pytest.raises(BufferError):
        copy_rows(b"\x00" * 8, 0, 8, SRC, 0, 8, 1, 8, native=native)


# ------------------------------------------------------------------------------ against the reference


HUGE = st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**63 + 1, U64_MAX])


@st.composite
def layout(draw, height: int, row: int) -> tuple[int, int, int]:
    """(buffer length, offset, pitch) for `height` rows of `row` bytes: seven times in ten a layout
    that fits, twice one that misses by a little (a last row ending up to 3 bytes past the end, a
    pitch up to 2 bytes short of the row), once values that may be anything, far out of range too."""
    kind = draw(st.integers(0, 9))
    if kind == 9:
        return draw(st.integers(0, 160)), draw(st.one_of(st.integers(0, 48), HUGE)), \
            draw(st.one_of(st.integers(0, 48), HUGE))
    offset = draw(st.integers(0, 24))
    short = draw(st.integers(1, 2)) if kind == 8 and height > 1 else 0
    pitch = max(row - short, 0) if short else row + draw(st.integers(0, 12))
    need = offset + pitch * max(height - 1, 0) + row
    if need > 4096:  # a huge height or row: any small buffer
        return draw(st.integers(0, 160)), offset, pitch
    over = draw(st.integers(1, 3)) if kind == 7 else 0
    return max(need - over, 0) + (draw(st.integers(0, 16)) if kind < 7 else 0), offset, pitch


@st.composite
def shapes(draw) -> tuple[int, tuple[int, int, int], tuple[int, int, int], int]:
    """(height, destination layout, source layout, row bytes): heights and rows mostly small, now and
    then 0, or huge."""
    def mostly(top: int) -> st.SearchStrategy[int]:
        small = st.integers(1, top)
        return st.one_of(small, small, small, st.integers(0, top), HUGE)

    height, row = draw(mostly(8)), draw(mostly(20))
    return height, draw(layout(height, row)), draw(layout(height, row)), row


@settings(max_examples=400, deadline=None)
@given(shapes())
def test_both_paths_match_the_reference_on_any_shape(shape):
    height, (dst_len, dst_offset, dst_pitch), (src_len, src_offset, src_pitch), row = shape
    src = bytes((7 * i + 3) % 251 for i in range(src_len))
    before = bytes((i * 13) % 256 for i in range(dst_len))
    err, after = reference(before, dst_offset, dst_pitch, src, src_offset, src_pitch, height, row)
    for native in (True, False):
        dst = bytearray(before)
        try:
            copy_rows(dst, dst_offset, dst_pitch, src, src_offset, src_pitch, height, row, native=native)
            got = 0
        except OSError as exc:
            got = exc.errno
        assert (got, bytes(dst)) == (err, after), "native" if native else "python"


def test_a_copy_between_overlapping_parts_of_one_buffer_is_defined():
    # memmove per row: copying a buffer onto itself, shifted, is not undefined behaviour in the C.
    buf = bytearray(SRC[:32])
    assert c_copy(buf, 4, 16, buf, 0, 16, 2, 12) == 0
    assert buf[4:16] == SRC[0:12] and buf[20:32] == SRC[16:28]


@PATHS
def test_no_mapping_stays_held_after_a_copy_or_a_refusal(native):
    # The copy rung closes its mappings in `finally` blocks, and mmap.close() fails while anything
    # still exports the mapping: neither a copy that ran nor one that was refused (whose traceback
    # keeps the wrapper's frame alive) may leave an export behind.
    src, dst = mmap.mmap(-1, 64), mmap.mmap(-1, 64)
    copy_rows(dst, 0, 8, src, 0, 8, 8, 8, native=native)
    with pytest.raises(OSError) as refused:
        copy_rows(dst, 0, 8, src, 0, 8, 9, 8, native=native)
    src.close()
    dst.close()
    assert src.closed and dst.closed and refused.value.errno == errno.ERANGE
