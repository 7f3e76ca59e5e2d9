"""Pure parts of the KMS layer: EDID identity, IN_FORMATS, fourcc/modifier names, mode choice, and
the errno → exception table. No device needed."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compositor.formats import fourcc, fourcc_name, modifier_name, modifier_value
from compositor.kms import errors
from compositor.kms.edid import EdidError, build_edid, parse_edid
from compositor.kms.in_formats import BlobError, build_in_formats, parse_in_formats
from compositor.kms.mode import DRM_MODE_TYPE_PREFERRED, Mode, ModeError, choose_mode, default_mode

X_TILED = (1 << 56) | 1

# --------------------------------------------------------------------------------------------- EDID

def _monitor_block() -> bytes:
    """A base block laid out like a typical monitor's: a detailed timing in the first descriptor
    slot (must be skipped), then serial string (0xFF), monitor name (0xFC) and range limits (0xFD)."""
    blob = bytearray(build_edid("DEL", 0xA0BA, 0x454C4C44, year=2017))
    blob[54:72] = bytes.fromhex("023a801871382d40582c4500fd1e1100001e")   # 1920x1080@60 timing
    blob[72:90] = bytes([0, 0, 0, 0xFF, 0]) + b"DELL1234\n    "
    blob[90:108] = bytes([0, 0, 0, 0xFC, 0]) + b"DELL U2415\n  "
    blob[108:126] = bytes([0, 0, 0, 0xFD, 0]) + bytes.fromhex("383d1e5311000a202020202020")
    blob[127] = (-sum(blob[:127])) & 0xFF
    return bytes(blob)


def test_monitor_edid_identity():
    e = parse_edid(_monitor_block())
    assert e.manufacturer == "DEL"
    assert e.product == 0xA0BA
    assert e.serial == 0x454C4C44
    assert e.serial_string == "DELL1234"
    assert e.name == "DELL U2415"
    assert e.year == 2017
    assert e.identity == "DEL:41146:1162628164:DELL1234"


def test_edid_roundtrip_and_identity_string():
    blob = build_edid("RHT", 0x1234, 7, name="QEMU Monitor", year=2014)
    assert len(blob) == 128 and sum(blob) % 256 == 0
    e = parse_edid(blob)
    assert (e.manufacturer, e.product, e.serial, e.name, e.serial_string, e.year) == (
        "RHT", 0x1234, 7, "QEMU Monitor", None, 2014)
    assert e.identity == "RHT:4660:7"
    assert e.to_json()["identity"] == "RHT:4660:7"


def test_edid_without_descriptors_has_no_name():
    e = parse_edid(build_edid("ABC", 1))
    assert e.name is None and e.serial_string is None


@pytest.mark.parametrize("blob, message", [
    (b"\x00\xff" * 10, "shorter than the 128-byte base block"),
    (b"\x01" * 128, "fixed header"),
    (bytes.fromhex("00ffffffffffff00") + b"\x00\x00" + bytes(118), "not three letters"),
])
def test_edid_errors_name_the_cause(blob, message):
    with pytest.raises(EdidError, match=message):
        parse_edid(blob)


@given(st.binary(min_size=0, max_size=300))
def test_edid_parser_never_crashes(blob):
    try:
        parse_edid(blob)
    except EdidError:
        pass


# -------------------------------------------------------------------------------- fourcc, modifiers

def test_fourcc_names():
    assert fourcc("XR24") == 0x34325258
    assert fourcc_name(0x34325258) == "XR24"
    assert fourcc_name(0x01020304) == "0x01020304"
    with pytest.raises(ValueError):
        fourcc("XR2")


@pytest.mark.parametrize("value, name", [
    (0, "LINEAR"), ((1 << 56) - 1, "INVALID"), (X_TILED, "I915_X_TILED"), ((2 << 56) | 0x123, "AMD:0x123"),
])
def test_modifier_names_roundtrip(value, name):
    assert modifier_name(value) == name
    assert modifier_value(name) == value


# --------------------------------------------------------------------------------------- IN_FORMATS

def test_in_formats_known_blob():
    # Hand-packed like the kernel: 2 formats, LINEAR for both, X-tiled only for the second.
    header = struct.pack("<6I", 1, 0, 2, 24, 2, 32)
    formats = struct.pack("<2I", fourcc("XR24"), fourcc("AR24"))
    mods = struct.pack("<QIIQ", 0b11, 0, 0, 0) + struct.pack("<QIIQ", 0b10, 0, 0, X_TILED)
    table = parse_in_formats(header + formats + mods)
    assert table == {fourcc("XR24"): [0], fourcc("AR24"): [0, X_TILED]}


@given(st.dictionaries(st.integers(1, 2**32 - 1),
                       st.lists(st.sampled_from([0, X_TILED, (2 << 56) | 5]), min_size=1, unique=True),
                       max_size=140))
def test_in_formats_roundtrip(table):
    # More than 64 formats exercises the per-64-format offset windows.
    parsed = parse_in_formats(build_in_formats(table))
    assert {f: sorted(m) for f, m in parsed.items()} == {f: sorted(m) for f, m in table.items()}


@pytest.mark.parametrize("blob, message", [
    (b"\x01\x00", "shorter than its header"),
    (struct.pack("<6I", 2, 0, 0, 24, 0, 24), "version 2"),
    (struct.pack("<6I", 1, 0, 1000, 24, 0, 24), "1000 formats"),
    (struct.pack("<6I", 1, 0, 0, 24, 5, 24), "5 modifiers"),
    (struct.pack("<6I", 1, 0, 1, 24, 1, 32) + struct.pack("<I", 1) + bytes(4)
     + struct.pack("<QIIQ", 0b100, 0, 0, 0), "names format #2 of 1"),
])
def test_in_formats_malformed(blob, message):
    with pytest.raises(BlobError, match=message):
        parse_in_formats(blob)


@given(st.binary(max_size=200))
def test_in_formats_never_reads_past_the_blob(blob):
    try:
        parse_in_formats(blob)
    except BlobError:
        pass


# -------------------------------------------------------------------------------------------- modes

def mode(w, h, hz=60, preferred=False):
    htotal, vtotal = w + 160, h + 30
    return Mode(name=f"{w}x{h}", clock=round(htotal * vtotal * hz / 1000), hdisplay=w, hsync_start=w + 48,
                hsync_end=w + 80, htotal=htotal, vdisplay=h, vsync_start=h + 3, vsync_end=h + 9,
                vtotal=vtotal,
                vrefresh=hz, type=DRM_MODE_TYPE_PREFERRED if preferred else 0)


def test_refresh_from_timings():
    m = Mode("1920x1080", 148500, 1920, 2008, 2052, 2200, 1080, 1084, 1089, 1125)
    assert m.refresh == pytest.approx(60.0)
    assert m.label() == "1920x1080@60.00"
    assert Mode.from_json(m.to_json()) == Mode("1920x1080", 148500, 1920, 2008, 2052, 2200, 1080, 1084,
                                               1089, 1125, vrefresh=60)


def test_default_prefers_the_preferred_flag():
    modes = [mode(5120, 2160), mode(1024, 768, preferred=True), mode(1920, 1080)]
    assert default_mode(modes).width == 1024


def test_default_without_preferred_skips_oversized_first_mode():
    # Forced connectors on virtio-gpu list 5120x2160 first and flag nothing preferred.
    modes = [mode(5120, 2160), mode(3840, 2160), mode(1920, 1080, 30), mode(1920, 1080, 60), mode(800, 600)]
    m = default_mode(modes)
    assert (m.width, m.height, round(m.refresh)) == (1920, 1080, 60)


def test_default_when_everything_is_big_takes_the_first():
    assert default_mode([mode(5120, 2160), mode(3840, 2160)]).width == 5120
    assert default_mode([]) is None


def test_choose_by_size_and_rate():
    modes = [mode(1920, 1080, 50), mode(1920, 1080, 60), mode(1280, 720, 60, preferred=True)]
    assert round(choose_mode(modes, "1920x1080").refresh) == 60
    assert round(choose_mode(modes, "1920x1080@50").refresh) == 50
    assert choose_mode(modes, "preferred").width == 1280


@pytest.mark.parametrize("spec, message", [
    ("800x600", r"no mode 800x600 on this connector \(offered: 1280x720@60.00\)"),
    ("1280x720@75", "no mode 1280x720@75"),
    ("big", "is not WIDTHxHEIGHT"),
])
def test_choose_errors_say_what_is_offered(spec, message):
    with pytest.raises(ModeError, match=message):
        choose_mode([mode(1280, 720)], spec)


def test_choose_on_connector_without_modes():
    with pytest.raises(ModeError, match="lists no modes"):
        choose_mode([], "preferred")


# ----------------------------------------------------------------------------------- errno classes

@pytest.mark.parametrize("err, cls", [
    (errno.EINVAL, errors.Rejected), (errno.ERANGE, errors.Rejected), (errno.ENOSPC, errors.Rejected),
    (errno.EBUSY, errors.Busy), (errno.EACCES, errors.NotMaster), (errno.EPERM, errors.NotMaster),
    (errno.EINTR, errors.Retry), (errno.EAGAIN, errors.Retry),
    (errno.ENOMEM, errors.KmsBug), (errno.EFAULT, errors.KmsBug), (errno.ENODEV, errors.KmsBug),
])
def test_errno_table(err, cls):
    exc = errors.kms_error("DRM_IOCTL_MODE_ATOMIC", err)
    assert type(exc) is cls
    assert exc.errno == err and exc.op == "DRM_IOCTL_MODE_ATOMIC"
    assert str(exc).startswith(f"DRM_IOCTL_MODE_ATOMIC failed: {errno.errorcode[err]} (")


def test_errno_override_names_the_cause():
    exc = errors.kms_error("drmPrimeFDToHandle", errno.ENODEV, "virtio_gpu cannot import",
                           overrides={errno.ENODEV: errors.Rejected})
    assert isinstance(exc, errors.Rejected)
    assert str(exc) == "drmPrimeFDToHandle failed: ENODEV (No such device): virtio_gpu cannot import"
