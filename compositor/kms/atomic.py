"""AtomicRequest: an append-only list of (object, property, value) committed in one ioctl.

The first failure while building (an unknown property, a value the property cannot take, a mode
blob the kernel would not create) is kept and makes every later `add` a no-op, so callers build
the whole request and check once, at commit. Mode blobs created for the request are destroyed if
the commit fails (or the request is discarded); after a real commit that succeeded the Card keeps
each CRTC's blob until the next mode replaces it. `dump()` lists the request with property names.
"""

from __future__ import annotations

import errno as E
import logging

from .card import Card, Framebuffer, KmsObject, Plane
from .drm import create_mode_blob, destroy_blob, ffi, lib
from .errors import KmsError, Rejected, kms_error
from .mode import Mode

log = logging.getLogger("directflip.kms")

TEST_ONLY = lib.DRM_MODE_ATOMIC_TEST_ONLY
NONBLOCK = lib.DRM_MODE_ATOMIC_NONBLOCK
ALLOW_MODESET = lib.DRM_MODE_ATOMIC_ALLOW_MODESET
PAGE_FLIP_EVENT = lib.DRM_MODE_PAGE_FLIP_EVENT


class BuildError(KmsError):
    """The request could not be built (raised at commit, for the first failed add)."""


def decode_flags(flags: int) -> str:
    names = [name for bit, name in ((TEST_ONLY, "TEST_ONLY"), (NONBLOCK, "NONBLOCK"),
                                    (ALLOW_MODESET, "ALLOW_MODESET"), (PAGE_FLIP_EVENT, "PAGE_FLIP_EVENT"))
             if flags & bit]
    return "|".join(names) or "0"


class AtomicRequest:
    def __init__(self, card: Card) -> None:
        self.card = card
        self.items: list[tuple[KmsObject, str, int]] = []
        self.error: KmsError | None = None
        self._blobs: list[tuple[int, int]] = []   # (CRTC id, blob id) created for this request
        self._labels: dict[int, str] = {}          # blob id → mode label, for dump()

    def add(self, obj: KmsObject, name: str, value: object) -> AtomicRequest:
        """Set property `name` of `obj`. Values: ints, enum names, objects (their id), None (0), and
        a Mode for MODE_ID (a blob is created). Chainable."""
        if self.error is not None:
            return self
        try:
            prop = obj.prop(name)
            if isinstance(value, Mode):
                value = self._mode_blob(obj, value)
            raw = prop.encode(value)
        except KmsError as exc:
            self.error = exc
            return self
        except (KeyError, ValueError, TypeError) as exc:
            self.error = BuildError("building atomic request", E.EINVAL, str(exc).strip('"'))
            return self
        self.items.append((obj, name, raw))
        return self

    def add_output(self, connector: KmsObject, crtc: KmsObject, mode: Mode | None) -> AtomicRequest:
        """Route connector → crtc with mode and light it; mode None turns the CRTC off (and the
        connector is detached). Needs commit(allow_modeset=True)."""
        if mode is None:
            return self.add(connector, "CRTC_ID", None).add(crtc, "ACTIVE", 0).add(crtc, "MODE_ID", None)
        return self.add(connector, "CRTC_ID", crtc).add(crtc, "MODE_ID", mode).add(crtc, "ACTIVE", 1)

    def add_plane(self, plane: KmsObject, crtc: KmsObject | None, fb: Framebuffer | None,
                  src: tuple[int, int, int, int] | None = None,
                  dst: tuple[int, int, int, int] | None = None) -> AtomicRequest:
        """Show fb on plane: src (x, y, w, h) in the framebuffer's pixels (default: all of it), dst
        on the CRTC (default: same size at 0,0). crtc or fb None disables the plane."""
        if crtc is None or fb is None:
            return self.add(plane, "FB_ID", None).add(plane, "CRTC_ID", None)
        sx, sy, sw, sh = src if src is not None else (0, 0, fb.width, fb.height)
        dx, dy, dw, dh = dst if dst is not None else (0, 0, sw, sh)
        self.add(plane, "FB_ID", fb).add(plane, "CRTC_ID", crtc)
        # SRC_* are 16.16 fixed point; CRTC_X/Y are signed.
        for name, v in (("SRC_X", sx << 16), ("SRC_Y", sy << 16), ("SRC_W", sw << 16), ("SRC_H", sh << 16),
                        ("CRTC_X", dx), ("CRTC_Y", dy), ("CRTC_W", dw), ("CRTC_H", dh)):
            self.add(plane, name, v)
        return self

    def _mode_blob(self, crtc: KmsObject, mode: Mode) -> int:
        blob = create_mode_blob(self.card.fd, mode)
        self._blobs.append((crtc.id, blob))
        self._labels[blob] = mode.label()
        return blob

    def test(self, *, allow_modeset: bool = False) -> None:
        """TEST_ONLY commit: raises if the kernel would refuse; changes nothing on screen."""
        self.commit(test_only=True, allow_modeset=allow_modeset)

    def commit(self, *, test_only: bool = False, allow_modeset: bool = False, nonblock: bool = False,
               event: bool = False, user_data: int = 0) -> None:
        flags = ((TEST_ONLY if test_only else 0) | (ALLOW_MODESET if allow_modeset else 0)
                 | (NONBLOCK if nonblock else 0) | (PAGE_FLIP_EVENT if event else 0))
        if self.error is not None:
            err = self.error
            if not test_only:
                self.discard()
            raise err
        n = len(self.items)
        objs = ffi.new("uint32_t[]", [o.id for o, _, _ in self.items])
        props = ffi.new("uint32_t[]", [o.prop(name).id for o, name, _ in self.items])
        vals = ffi.new("uint64_t[]", [v for _, _, v in self.items])
        ret = lib.kms_atomic_commit(self.card.fd, n, objs, props, vals, flags, user_data)
        if ret < 0:
            exc = kms_error("DRM_IOCTL_MODE_ATOMIC", -ret, f"flags {decode_flags(flags)}, {n} properties")
            if test_only and isinstance(exc, Rejected):
                log.debug("TEST_ONLY refused (%s):\n%s", exc, self.dump())
            else:
                log.error("atomic commit failed (%s):\n%s", exc, self.dump())
            if not test_only:
                self.discard()
            raise exc
        if not test_only:
            for crtc_id, blob in self._blobs:
                self.card._adopt_mode_blob(crtc_id, blob)
            self._blobs.clear()

    def discard(self) -> None:
        """Destroy the mode blobs this request created (the rollback after a failed commit)."""
        for _, blob in self._blobs:
            destroy_blob(self.card.fd, blob)
        self._blobs.clear()

    def __enter__(self) -> AtomicRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def dump(self) -> str:
        lines = []
        for obj, name, raw in self.items:
            prop = obj.prop(name)
            shown = prop.describe(raw)
            if name == "MODE_ID" and raw in self._labels:
                shown = f"blob {raw} ({self._labels[raw]})"
            label = getattr(obj, "name", None) or (obj.type if isinstance(obj, Plane) else "")
            lines.append(f"  {obj.kind} {obj.id}{f' ({label})' if label else ''} {name} = {shown}")
        if self.error is not None:
            lines.append(f"  (first build error: {self.error})")
        return "\n".join(lines) or "  (empty)"

    def __len__(self) -> int:
        return len(self.items)
