"""One errno → exception table for every libdrm call.

The class tells the caller what to do next, the message names the ioctl and the cause:
- Rejected (EINVAL, ERANGE, ENOSPC): the kernel said no to this configuration; try the next rung.
- Busy (EBUSY): a flip is still pending on that CRTC; wait for its event.
- NotMaster (EACCES, EPERM): we are not DRM master (the session is paused or another server owns it).
- Retry (EINTR, EAGAIN): transient; do the same call again.
- KmsBug: anything else — a bug here or in the driver, reported with the ioctl named.
"""

from __future__ import annotations

import errno as E
import os


class KmsError(Exception):
    """A KMS call failed. `errno` and `op` (the libdrm call) are always set."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        self.op = op
        self.errno = err
        self.detail = detail
        name = E.errorcode.get(err, str(err))
        text = f"{op} failed: {name} ({os.strerror(err)})"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class Rejected(KmsError):
    """The kernel refused the request (EINVAL/ERANGE/ENOSPC): try another configuration."""


class Busy(KmsError):
    """A page flip is still pending (EBUSY): wait for the flip event."""


class NotMaster(KmsError):
    """Not DRM master (EACCES/EPERM): the session is paused or another process owns the display."""


class Retry(KmsError):
    """Interrupted or would block (EINTR/EAGAIN): call again."""


class KmsBug(KmsError):
    """An errno no caller can act on: a bug, reported with the call that raised it."""


class DeviceError(Exception):
    """Opening or setting up a card failed in a way a user must fix (no device, permission, driver)."""


_TABLE: dict[int, type[KmsError]] = {
    E.EINVAL: Rejected,
    E.ERANGE: Rejected,
    E.ENOSPC: Rejected,
    E.EBUSY: Busy,
    E.EACCES: NotMaster,
    E.EPERM: NotMaster,
    E.EINTR: Retry,
    E.EAGAIN: Retry,
}


def error_class(err: int) -> type[KmsError]:
    return _TABLE.get(err, KmsBug)


def kms_error(op: str, err: int, detail: str = "",
              overrides: dict[int, type[KmsError]] | None = None) -> KmsError:
    """The exception for `err` from `op`. `overrides` lets one call site classify an errno that means
    something specific there (ENODEV from a PRIME import is a refusal, not a bug)."""
    cls = (overrides or {}).get(err) or error_class(err)
    return cls(op, err, detail)
