"""libdrm through cffi: the handles every KMS module calls, and the low-level pieces card.py (objects,
buffers) and atomic.py (requests) share, so that neither has to import the other's internals.

It imports no KMS module that itself calls libdrm: the import graph of compositor.kms stays acyclic
with this module at its bottom.
"""

from __future__ import annotations

import errno as E
import logging
from typing import Any

from .._native import ffi as _native_ffi
from .._native import lib as _native_lib
from .errors import KmsError, kms_error
from .mode import Mode

# compositor._native is cffi's generated extension module and carries no type information. Its two
# handles are typed Any here, once; every KMS module takes them from this module (and a test that
# stands in for libdrm replaces `lib` in the modules that call it).
ffi: Any = _native_ffi
lib: Any = _native_lib

log = logging.getLogger("directflip.kms")

_LOG_LEVELS = {10, 20, 30, 40, 50}


def _kms_log_cb(level: int, message: Any) -> None:
    """Log lines of kms_helpers.c (a `const char *`), through the KMS layer's logger."""
    log.log(level if level in _LOG_LEVELS else logging.INFO, "native: %s", ffi.string(message).decode())


# Registered by a call rather than as a decorator: ffi is untyped, and an untyped decorator would
# make the function untyped for the type checker too.
ffi.def_extern()(_kms_log_cb)
lib.kms_set_logger(lib._kms_log_cb)

ErrorOverrides = dict[int, type[KmsError]]


def neg_errno_check(ret: int, op: str, detail: str = "", overrides: ErrorOverrides | None = None) -> int:
    """For libdrm calls that return -errno (the drmMode* ioctl wrappers)."""
    if ret < 0:
        raise kms_error(op, -ret, detail, overrides)
    return ret


def errno_check(ret: int, op: str, detail: str = "", overrides: ErrorOverrides | None = None) -> int:
    """For libdrm calls that return -1 and set errno (drmIoctl-style: drmPrime*, caps, master)."""
    if ret != 0:
        raise kms_error(op, ffi.errno or E.EIO, detail, overrides)
    return ret


# ------------------------------------------------------------------------------------------- modes

_MODE_FIELDS = ("clock", "hdisplay", "hsync_start", "hsync_end", "htotal", "hskew", "vdisplay",
                "vsync_start", "vsync_end", "vtotal", "vscan", "vrefresh", "flags", "type")


def mode_from_c(m: Any) -> Mode:
    """A drmModeModeInfo (a cdata struct) as a Mode."""
    return Mode(name=ffi.string(m.name).decode(errors="replace"), clock=m.clock, hdisplay=m.hdisplay,
                hsync_start=m.hsync_start, hsync_end=m.hsync_end, htotal=m.htotal, vdisplay=m.vdisplay,
                vsync_start=m.vsync_start, vsync_end=m.vsync_end, vtotal=m.vtotal, hskew=m.hskew,
                vscan=m.vscan, vrefresh=m.vrefresh, flags=m.flags, type=m.type)


def mode_to_c(mode: Mode) -> Any:
    """A new `drmModeModeInfo *` holding mode (owned by the returned cdata)."""
    m = ffi.new("drmModeModeInfo *")
    for field in _MODE_FIELDS:
        setattr(m, field, getattr(mode, field))
    m.name = mode.name.encode()[:31]
    return m


# ------------------------------------------------------------------------------------------- blobs

def create_mode_blob(fd: int, mode: Mode) -> int:
    """A property blob holding mode (what MODE_ID takes): its id. The caller destroys it."""
    info = mode_to_c(mode)
    blob = ffi.new("uint32_t *")
    ret = lib.drmModeCreatePropertyBlob(fd, info, ffi.sizeof("drmModeModeInfo"), blob)
    neg_errno_check(ret, "drmModeCreatePropertyBlob", f"mode {mode.label()}")
    return int(blob[0])


def destroy_blob(fd: int, blob_id: int) -> None:
    """Destroy a blob this client created. Its result is not checked: every caller is already
    letting go of the blob (a rollback, a replaced mode, closing the card), and the kernel frees
    whatever is left when the card's descriptor closes."""
    lib.drmModeDestroyPropertyBlob(fd, blob_id)
