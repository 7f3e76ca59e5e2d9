"""A DRM card and its KMS objects, on libdrm through cffi.

Object model (after pykms): a Card owns its fd and every object read from it; Connector, Crtc,
Encoder and Plane keep their Card alive and carry their properties resolved by name once (ids are
per device, so the Card caches each property's metadata by id). Reading state never needs DRM
master; committing does.
"""

from __future__ import annotations

import asyncio
import errno as E
import logging
import mmap
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from ..formats import DRM_FORMAT_MOD_INVALID, DRM_FORMAT_MOD_LINEAR, fourcc_name
from .drm import destroy_blob, errno_check, ffi, lib, mode_from_c, neg_errno_check
from .edid import EdidError, EdidIdentity, parse_edid
from .errors import DeviceError, KmsError, NotMaster, Rejected, kms_error
from .in_formats import BlobError, parse_in_formats
from .mode import Mode
from .wait import readable

log = logging.getLogger("directflip.kms")

OBJECT_TYPES = {
    "connector": lib.DRM_MODE_OBJECT_CONNECTOR,
    "crtc": lib.DRM_MODE_OBJECT_CRTC,
    "plane": lib.DRM_MODE_OBJECT_PLANE,
}
PLANE_TYPES = {0: "overlay", 1: "primary", 2: "cursor"}
CONNECTION = {1: "connected", 2: "disconnected", 3: "unknown"}
WRITEBACK_CONNECTOR_TYPE = 18


# --------------------------------------------------------------------------------------- properties

@dataclass(frozen=True)
class Property:
    id: int
    name: str
    flags: int
    enums: dict[str, int]      # enum and bitmask names → values
    values: tuple[int, ...]    # range bounds (min, max) for ranges

    @property
    def kind(self) -> str:
        ext = self.flags & lib.DRM_MODE_PROP_EXTENDED_TYPE
        if ext == lib.DRM_MODE_PROP_OBJECT:
            return "object"
        if ext == lib.DRM_MODE_PROP_SIGNED_RANGE:
            return "signed_range"
        for flag, name in ((lib.DRM_MODE_PROP_RANGE, "range"), (lib.DRM_MODE_PROP_ENUM, "enum"),
                           (lib.DRM_MODE_PROP_BLOB, "blob"), (lib.DRM_MODE_PROP_BITMASK, "bitmask")):
            if self.flags & flag:
                return name
        return "unknown"

    @property
    def immutable(self) -> bool:
        return bool(self.flags & lib.DRM_MODE_PROP_IMMUTABLE)

    def encode(self, value: object) -> int:
        """A Python value → the u64 the kernel takes: enum names, objects with `.id`, None → 0."""
        if value is None:
            return 0
        if isinstance(value, str):
            if value not in self.enums:
                raise ValueError(f"property {self.name} has no value {value!r} "
                                 f"(it takes {', '.join(self.enums)})")
            return self.enums[value]
        if hasattr(value, "id"):
            return int(value.id)
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value & 0xFFFFFFFFFFFFFFFF
        raise TypeError(f"cannot set property {self.name} to {value!r}")

    def describe(self, raw: int) -> str:
        """The raw value as a person would read it (enum name, signed number)."""
        if self.kind == "enum":
            for name, v in self.enums.items():
                if v == raw:
                    return name
        if self.kind == "signed_range" and raw >= 1 << 63:
            return str(raw - (1 << 64))
        return str(raw)


class KmsObject:
    """A connector, CRTC or plane: an id, its Card, and its properties by name."""

    kind = ""

    def __init__(self, card: Card, obj_id: int) -> None:
        self.card = card
        self.id = obj_id
        self.props: dict[str, Property] = {}
        self.values: dict[str, int] = {}
        self.refresh_props()

    def refresh_props(self) -> None:
        self.props, self.values = self.card._object_properties(self.id, OBJECT_TYPES[self.kind])

    def prop(self, name: str) -> Property:
        try:
            return self.props[name]
        except KeyError:
            raise KeyError(f"{self.kind} {self.id} on {self.card.driver} has no property {name!r} "
                           f"(it has {', '.join(sorted(self.props))})") from None

    def value(self, name: str, default: int | None = None) -> int | None:
        return self.values.get(name, default)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} on {self.card.path}>"


@dataclass(frozen=True)
class Encoder:
    id: int
    type: int
    crtc_id: int
    possible_crtcs: int   # bit mask of CRTC indices
    possible_clones: int


class Connector(KmsObject):
    kind = "connector"

    def __init__(self, card: Card, obj_id: int) -> None:
        super().__init__(card, obj_id)
        self.refresh()

    def refresh(self, *, probe: bool = True) -> None:
        """Re-read status and modes. probe=True asks the driver to re-detect (what a hotplug needs);
        False returns the kernel's cached state."""
        get = lib.drmModeGetConnector if probe else lib.drmModeGetConnectorCurrent
        c = get(self.card.fd, self.id)
        if c == ffi.NULL:
            raise kms_error("drmModeGetConnector", ffi.errno or E.ENOENT, f"connector {self.id}")
        try:
            self.type: int = c.connector_type
            self.type_index: int = c.connector_type_id
            tname = lib.drmModeGetConnectorTypeName(c.connector_type)
            self.type_name = ffi.string(tname).decode() if tname != ffi.NULL else f"Unknown{self.type}"
            self.status = CONNECTION.get(int(c.connection), "unknown")
            self.mm_size = (c.mmWidth, c.mmHeight)
            self.modes = [mode_from_c(c.modes[i]) for i in range(c.count_modes)]
            self.encoder_ids = [c.encoders[i] for i in range(c.count_encoders)]
        finally:
            lib.drmModeFreeConnector(c)
        self.refresh_props()

    @property
    def name(self) -> str:
        return f"{self.type_name}-{self.type_index}"

    @property
    def connected(self) -> bool:
        return self.status == "connected"

    @property
    def is_writeback(self) -> bool:
        return self.type == WRITEBACK_CONNECTOR_TYPE

    @property
    def preferred_mode(self) -> Mode | None:
        return next((m for m in self.modes if m.preferred), None)

    @property
    def edid_blob(self) -> bytes | None:
        blob_id = self.values.get("EDID", 0)
        return self.card.read_blob(blob_id) if blob_id else None

    @property
    def edid(self) -> EdidIdentity | None:
        blob = self.edid_blob
        if not blob:
            return None
        try:
            return parse_edid(blob)
        except EdidError as exc:
            log.warning("connector %s: unreadable EDID: %s", self.name, exc)
            return None

    @property
    def link_status(self) -> str | None:
        if "link-status" not in self.props:
            return None
        return self.props["link-status"].describe(self.values["link-status"]).lower()

    @property
    def crtc(self) -> Crtc | None:
        crtc_id = self.values.get("CRTC_ID", 0)
        return self.card.crtc_by_id(crtc_id) if crtc_id else None

    @property
    def possible_crtcs(self) -> list[Crtc]:
        mask = 0
        for enc_id in self.encoder_ids:
            mask |= self.card.encoder(enc_id).possible_crtcs
        return [c for c in self.card.crtcs if mask & (1 << c.index)]


class Crtc(KmsObject):
    kind = "crtc"

    def __init__(self, card: Card, obj_id: int, index: int) -> None:
        self.index = index
        super().__init__(card, obj_id)
        self.refresh()

    def refresh(self) -> None:
        c = lib.drmModeGetCrtc(self.card.fd, self.id)
        if c == ffi.NULL:
            raise kms_error("drmModeGetCrtc", ffi.errno or E.ENOENT, f"CRTC {self.id}")
        try:
            self.mode = mode_from_c(c.mode) if c.mode_valid else None
            self.fb_id = c.buffer_id
        finally:
            lib.drmModeFreeCrtc(c)
        self.refresh_props()

    @property
    def active(self) -> bool:
        return bool(self.values.get("ACTIVE", 1 if self.mode else 0))


class Plane(KmsObject):
    kind = "plane"

    def __init__(self, card: Card, obj_id: int) -> None:
        super().__init__(card, obj_id)
        self.refresh()

    def refresh(self) -> None:
        p = lib.drmModeGetPlane(self.card.fd, self.id)
        if p == ffi.NULL:
            raise kms_error("drmModeGetPlane", ffi.errno or E.ENOENT, f"plane {self.id}")
        try:
            legacy_formats = [p.formats[i] for i in range(p.count_formats)]
            self.possible_crtc_mask = p.possible_crtcs
        finally:
            lib.drmModeFreePlane(p)
        self.refresh_props()
        self.formats: dict[int, list[int]] = {}
        blob_id = self.values.get("IN_FORMATS", 0)
        if blob_id:
            try:
                self.formats = parse_in_formats(self.card.read_blob(blob_id) or b"")
            except BlobError as exc:
                log.warning("plane %d: %s; using its plain format list", self.id, exc)
        if not self.formats:
            self.formats = {fmt: [DRM_FORMAT_MOD_LINEAR] for fmt in legacy_formats}

    @property
    def type(self) -> str:
        return PLANE_TYPES.get(self.values.get("type", 0), "overlay")

    @property
    def possible_crtcs(self) -> list[Crtc]:
        return [c for c in self.card.crtcs if self.possible_crtc_mask & (1 << c.index)]

    def supports(self, fmt: int, modifier: int = DRM_FORMAT_MOD_LINEAR) -> bool:
        mods = self.formats.get(fmt)
        if mods is None:
            return False
        return modifier == DRM_FORMAT_MOD_INVALID or modifier in mods

    @property
    def zpos(self) -> dict[str, int | bool] | None:
        prop = self.props.get("zpos")
        if prop is None:
            return None
        lo, hi = (prop.values + (0, 0))[:2]
        return {"min": lo, "max": hi, "value": self.values["zpos"], "immutable": prop.immutable}


# ----------------------------------------------------------------------------------------- buffers

@dataclass
class DumbBuffer:
    """A CPU-mappable buffer the driver allocates (DRM_IOCTL_MODE_CREATE_DUMB)."""

    card: Card
    handle: int
    width: int
    height: int
    bpp: int
    pitch: int
    size: int
    _map: mmap.mmap | None = None

    def map(self) -> mmap.mmap:
        if self._map is None:
            offset = ffi.new("uint64_t *")
            neg_errno_check(lib.drmModeMapDumbBuffer(self.card.fd, self.handle, offset),
                            "drmModeMapDumbBuffer", f"handle {self.handle}")
            self._map = mmap.mmap(self.card.fd, self.size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=offset[0])
        return self._map

    def destroy(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.handle:
            self._free_handle()
            self.handle = 0

    def _free_handle(self) -> None:
        lib.drmModeDestroyDumbBuffer(self.card.fd, self.handle)


@dataclass
class Framebuffer:
    card: Card
    id: int
    width: int
    height: int
    format: int
    modifier: int

    def remove(self) -> None:
        if self.id:
            neg_errno_check(lib.drmModeRmFB(self.card.fd, self.id), "drmModeRmFB", f"FB {self.id}")
            self.id = 0


@dataclass(frozen=True)
class FlipEvent:
    crtc_id: int
    sequence: int
    timestamp_ns: int
    user_data: int


class EventReader(Protocol):
    """What Card.attach needs of the data plane (compositor.dataplane): it takes over reading the
    card's descriptor and names the card by a number of its own."""

    def add_card(self, fd: int) -> int: ...


# -------------------------------------------------------------------------------------------- card

class Card:
    """An open DRM device. `kms=False` opens a card only for buffers (vgem, a render-only driver)."""

    def __init__(self, path: str, *, kms: bool = True, writeback: bool | Literal["try"] = False,
                 fd: int | None = None) -> None:
        """Open `path`, or adopt `fd` (an open descriptor of `path` handed over by logind; the Card
        owns it from then on). `writeback="try"` asks for writeback connectors where the driver has them."""
        self.path = path
        if fd is not None:
            # A descriptor handed over (logind's TakeDevice opens it blocking): events are read
            # without ever waiting, on the loop and on the data plane's thread alike.
            os.set_blocking(fd, False)
        try:
            self.fd = fd if fd is not None else os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise DeviceError(f"no DRM device at {path}") from None
        except PermissionError:
            raise DeviceError(f"no permission to open {path}: run as root, or as a member of the "
                              f"group that owns it ({_owner_group(path)})") from None
        except OSError as exc:
            raise DeviceError(f"cannot open {path}: {exc.strerror}") from None
        self._prop_cache: dict[int, Property] = {}
        self._waiters: dict[int, asyncio.Future[FlipEvent]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dp_card = -1  # the data plane's name for this card once it reads the fd (attach)
        self._mode_blobs: dict[int, int] = {}   # CRTC id → the blob of the mode we set on it
        self.flip_handlers: list[Callable[[FlipEvent], object]] = []   # called for every flip event
        self.connectors: list[Connector] = []
        self.crtcs: list[Crtc] = []
        self.planes: list[Plane] = []
        self.encoders: list[Encoder] = []
        try:
            self._read_version()
            self.writeback = False
            self.has_atomic = False
            if kms:
                self._set_kms_caps(writeback)
                self.refresh()
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    # -- setup
    def _read_version(self) -> None:
        v = lib.drmGetVersion(self.fd)
        if v == ffi.NULL:
            raise DeviceError(f"{self.path} is not a DRM device (DRM_IOCTL_VERSION failed)")
        try:
            self.driver = ffi.string(v.name, v.name_len).decode()
            self.driver_desc = ffi.string(v.desc, v.desc_len).decode() if v.desc_len else ""
        finally:
            lib.drmFreeVersion(v)

    def _set_kms_caps(self, writeback: bool | Literal["try"]) -> None:
        if lib.drmSetClientCap(self.fd, lib.DRM_CLIENT_CAP_UNIVERSAL_PLANES, 1) != 0:
            raise DeviceError(f"{self.path} ({self.driver}) has no universal planes "
                              f"({os.strerror(ffi.errno)}): not a modesetting driver")
        if lib.drmSetClientCap(self.fd, lib.DRM_CLIENT_CAP_ATOMIC, 1) != 0:
            raise DeviceError(f"{self.path} ({self.driver}) has no atomic modesetting "
                              f"({os.strerror(ffi.errno)}); directflip needs an atomic KMS driver")
        self.has_atomic = True
        if writeback:
            if lib.drmSetClientCap(self.fd, lib.DRM_CLIENT_CAP_WRITEBACK_CONNECTORS, 1) != 0:
                if writeback == "try":
                    return
                raise DeviceError(f"{self.path} ({self.driver}) has no writeback connectors "
                                  f"({os.strerror(ffi.errno)})")
            self.writeback = True

    def get_cap(self, cap: int) -> int:
        value = ffi.new("uint64_t *")
        if lib.drmGetCap(self.fd, cap, value) != 0:
            return 0
        return int(value[0])

    @property
    def caps(self) -> dict[str, bool | int]:
        prime = self.get_cap(lib.DRM_CAP_PRIME)
        return {
            "atomic": self.has_atomic,
            "dumb_buffer": bool(self.get_cap(lib.DRM_CAP_DUMB_BUFFER)),
            "prime_import": bool(prime & lib.DRM_PRIME_CAP_IMPORT),
            "prime_export": bool(prime & lib.DRM_PRIME_CAP_EXPORT),
            "addfb2_modifiers": bool(self.get_cap(lib.DRM_CAP_ADDFB2_MODIFIERS)),
            "writeback": self.writeback,
            "cursor_width": self.get_cap(lib.DRM_CAP_CURSOR_WIDTH),
            "cursor_height": self.get_cap(lib.DRM_CAP_CURSOR_HEIGHT),
        }

    def refresh(self) -> None:
        """(Re)read every object. Connectors are probed, so call this on hotplug."""
        res = lib.drmModeGetResources(self.fd)
        if res == ffi.NULL:
            raise DeviceError(f"{self.path} ({self.driver}) has no KMS resources "
                              f"({os.strerror(ffi.errno or E.ENODEV)})")
        try:
            crtc_ids = [res.crtcs[i] for i in range(res.count_crtcs)]
            conn_ids = [res.connectors[i] for i in range(res.count_connectors)]
            enc_ids = [res.encoders[i] for i in range(res.count_encoders)]
        finally:
            lib.drmModeFreeResources(res)
        self.crtcs = [Crtc(self, cid, i) for i, cid in enumerate(crtc_ids)]
        self.encoders = [self._read_encoder(eid) for eid in enc_ids]
        self.connectors = [Connector(self, cid) for cid in conn_ids]
        pres = lib.drmModeGetPlaneResources(self.fd)
        if pres == ffi.NULL:
            raise kms_error("drmModeGetPlaneResources", ffi.errno or E.EIO)
        try:
            plane_ids = [pres.planes[i] for i in range(pres.count_planes)]
        finally:
            lib.drmModeFreePlaneResources(pres)
        self.planes = [Plane(self, pid) for pid in plane_ids]

    def _read_encoder(self, enc_id: int) -> Encoder:
        e = lib.drmModeGetEncoder(self.fd, enc_id)
        if e == ffi.NULL:
            raise kms_error("drmModeGetEncoder", ffi.errno or E.ENOENT, f"encoder {enc_id}")
        try:
            return Encoder(e.encoder_id, e.encoder_type, e.crtc_id, e.possible_crtcs, e.possible_clones)
        finally:
            lib.drmModeFreeEncoder(e)

    def _object_properties(self, obj_id: int, obj_type: int) -> tuple[dict[str, Property], dict[str, int]]:
        op = lib.drmModeObjectGetProperties(self.fd, obj_id, obj_type)
        if op == ffi.NULL:
            raise kms_error("drmModeObjectGetProperties", ffi.errno or E.ENOENT, f"object {obj_id}")
        props: dict[str, Property] = {}
        values: dict[str, int] = {}
        try:
            for i in range(op.count_props):
                prop = self._property(op.props[i])
                props[prop.name] = prop
                values[prop.name] = int(op.prop_values[i])
        finally:
            lib.drmModeFreeObjectProperties(op)
        return props, values

    def _property(self, prop_id: int) -> Property:
        cached = self._prop_cache.get(prop_id)
        if cached is not None:
            return cached
        p = lib.drmModeGetProperty(self.fd, prop_id)
        if p == ffi.NULL:
            raise kms_error("drmModeGetProperty", ffi.errno or E.ENOENT, f"property {prop_id}")
        try:
            enums = {ffi.string(p.enums[i].name).decode(): int(p.enums[i].value)
                     for i in range(p.count_enums)}
            values = tuple(int(p.values[i]) for i in range(p.count_values))
            prop = Property(p.prop_id, ffi.string(p.name).decode(), p.flags, enums, values)
        finally:
            lib.drmModeFreeProperty(p)
        self._prop_cache[prop_id] = prop
        return prop

    # -- lookups
    def crtc_by_id(self, crtc_id: int) -> Crtc:
        for c in self.crtcs:
            if c.id == crtc_id:
                return c
        raise KeyError(f"no CRTC {crtc_id} on {self.path}")

    def connector(self, name: str) -> Connector:
        for c in self.connectors:
            if c.name == name:
                return c
        raise KeyError(f"no connector {name} on {self.path} (it has "
                       f"{', '.join(c.name for c in self.connectors)})")

    def encoder(self, enc_id: int) -> Encoder:
        for e in self.encoders:
            if e.id == enc_id:
                return e
        raise KeyError(f"no encoder {enc_id} on {self.path}")

    def planes_for(self, crtc: Crtc, type: str | None = None) -> list[Plane]:
        return [p for p in self.planes
                if p.possible_crtc_mask & (1 << crtc.index) and (type is None or p.type == type)]

    def read_blob(self, blob_id: int) -> bytes | None:
        b = lib.drmModeGetPropertyBlob(self.fd, blob_id)
        if b == ffi.NULL:
            return None
        try:
            return bytes(ffi.buffer(b.data, b.length))
        finally:
            lib.drmModeFreePropertyBlob(b)

    # -- master
    @property
    def is_master(self) -> bool:
        return bool(lib.drmIsMaster(self.fd))

    def become_master(self) -> None:
        if self.is_master:
            return
        if lib.drmSetMaster(self.fd) != 0:
            raise NotMaster("drmSetMaster", ffi.errno or E.EACCES,
                            f"{self.path}: another process (a display server or another directflip) "
                            f"is DRM master")

    def drop_master(self) -> None:
        if self.is_master:
            errno_check(lib.drmDropMaster(self.fd), "drmDropMaster")

    # -- buffers
    def create_dumb(self, width: int, height: int, bpp: int = 32) -> DumbBuffer:
        handle, pitch, size = ffi.new("uint32_t *"), ffi.new("uint32_t *"), ffi.new("uint64_t *")
        neg_errno_check(lib.drmModeCreateDumbBuffer(self.fd, width, height, bpp, 0, handle, pitch, size),
                        "drmModeCreateDumbBuffer", f"{width}x{height}x{bpp} on {self.driver}")
        return DumbBuffer(self, handle[0], width, height, bpp, pitch[0], size[0])

    def add_framebuffer(self, width: int, height: int, fmt: int, handles: Iterable[int],
                        pitches: Iterable[int], offsets: Iterable[int] = (0,),
                        modifier: int | None = None) -> Framebuffer:
        """AddFB2, with modifiers when one is given (DRM_FORMAT_MOD_INVALID or None: implicit)."""
        h = ffi.new("uint32_t[4]", list(handles))
        p = ffi.new("uint32_t[4]", list(pitches))
        o = ffi.new("uint32_t[4]", list(offsets))
        fb_id = ffi.new("uint32_t *")
        what = f"{width}x{height} {fourcc_name(fmt)}"
        if modifier not in (None, DRM_FORMAT_MOD_INVALID, DRM_FORMAT_MOD_LINEAR) and \
                not self.get_cap(lib.DRM_CAP_ADDFB2_MODIFIERS):
            raise Rejected("drmModeAddFB2WithModifiers", E.EINVAL,
                           f"{what}: {self.driver} takes no format modifiers, only linear buffers")
        # A driver without modifier support (virtio-gpu on 6.1) refuses DRM_MODE_FB_MODIFIERS even
        # for LINEAR, which is what a plain AddFB2 means there.
        if modifier in (None, DRM_FORMAT_MOD_INVALID) or (
                modifier == DRM_FORMAT_MOD_LINEAR and not self.get_cap(lib.DRM_CAP_ADDFB2_MODIFIERS)):
            ret = lib.drmModeAddFB2(self.fd, width, height, fmt, h, p, o, fb_id, 0)
            neg_errno_check(ret, "drmModeAddFB2", what)
            modifier = DRM_FORMAT_MOD_INVALID
        else:
            mods = ffi.new("uint64_t[4]", [modifier if h[i] else 0 for i in range(4)])
            ret = lib.drmModeAddFB2WithModifiers(self.fd, width, height, fmt, h, p, o, mods, fb_id,
                                                 lib.DRM_MODE_FB_MODIFIERS)
            neg_errno_check(ret, "drmModeAddFB2WithModifiers", what)
        return Framebuffer(self, fb_id[0], width, height, fmt, modifier)

    def dumb_framebuffer(self, buf: DumbBuffer, fmt: int) -> Framebuffer:
        return self.add_framebuffer(buf.width, buf.height, fmt, [buf.handle], [buf.pitch], [0],
                                    DRM_FORMAT_MOD_LINEAR)

    def dirty(self, fb: Framebuffer) -> None:
        """Tell the driver the CPU wrote to fb (virtio-gpu only uploads to the host on this).
        Drivers that need no flush answer ENOSYS, which is fine."""
        ret = lib.drmModeDirtyFB(self.fd, fb.id, ffi.NULL, 0)
        if ret < 0 and -ret not in (E.ENOSYS, E.EOPNOTSUPP):
            raise kms_error("drmModeDirtyFB", -ret, f"FB {fb.id}")

    def export_dmabuf(self, handle: int) -> int:
        fd = ffi.new("int *")
        errno_check(lib.drmPrimeHandleToFD(self.fd, handle, lib.DRM_CLOEXEC | lib.DRM_RDWR, fd),
                    "drmPrimeHandleToFD", f"handle {handle} on {self.driver}")
        return int(fd[0])

    def import_dmabuf(self, dmabuf_fd: int) -> int:
        """PRIME import: the GEM handle of the dma-buf on this card. A driver that cannot use a
        buffer from another device (virtio-gpu answers ENODEV) raises Rejected saying so."""
        handle = ffi.new("uint32_t *")
        if lib.drmPrimeFDToHandle(self.fd, dmabuf_fd, handle) != 0:
            err = ffi.errno or E.EIO
            detail = f"dma-buf fd {dmabuf_fd} into {self.driver}"
            if err in (E.ENODEV, E.EOPNOTSUPP):
                detail += (f": {self.driver} cannot import a buffer exported by another device; "
                           f"it needs a copy")
            raise kms_error("drmPrimeFDToHandle", err, detail,
                            overrides={E.ENODEV: Rejected, E.EOPNOTSUPP: Rejected})
        return int(handle[0])

    def close_handle(self, handle: int) -> None:
        errno_check(lib.drmCloseBufferHandle(self.fd, handle), "drmCloseBufferHandle", f"handle {handle}")

    # -- commits (an AtomicRequest, compositor/kms/atomic.py, is built on a Card)
    def _adopt_mode_blob(self, crtc_id: int, blob_id: int) -> None:
        old = self._mode_blobs.get(crtc_id)
        self._mode_blobs[crtc_id] = blob_id
        if old and old != blob_id:
            destroy_blob(self.fd, old)

    # -- events
    def dispatch_events(self) -> list[FlipEvent]:
        """Read pending DRM events; resolve the waiting futures of their CRTCs and call
        flip_handlers. Safe to call when nothing is pending (returns [])."""
        buf = ffi.new("struct kms_flip_event[64]")
        dropped = ffi.new("int *")
        n = lib.kms_drain_events(self.fd, buf, 64, dropped)
        if n < 0:
            raise kms_error("read (DRM events)", -n, self.path)
        if dropped[0]:
            log.error("%s: %d flip events did not fit the buffer", self.path, dropped[0])
        events = [FlipEvent(buf[i].crtc_id, buf[i].sequence, buf[i].timestamp_ns, buf[i].user_data)
                  for i in range(n)]
        self.deliver(events)
        return events

    def deliver(self, events: Iterable[FlipEvent]) -> None:
        """Hand flip events read from this card (here, or by the data plane) to their waiters."""
        for ev in events:
            fut = self._waiters.pop(ev.crtc_id, None)
            if fut is not None and not fut.done():
                fut.set_result(ev)
            for handler in self.flip_handlers:
                handler(ev)

    def attach(self, loop: asyncio.AbstractEventLoop | None = None,
               dataplane: EventReader | None = None) -> None:
        """Deliver flip events through the asyncio loop: the fd turning readable dispatches them.
        With a data plane (compositor.dataplane), its thread reads the fd from now on: it handles
        the events of its own commits and hands the others back, which the daemon deliver()s."""
        self._loop = loop or asyncio.get_running_loop()
        if dataplane is not None:
            self.dp_card = dataplane.add_card(self.fd)
        else:
            self._loop.add_reader(self.fd, self.dispatch_events)

    def detach(self) -> None:
        if self._loop is not None:
            if self.dp_card < 0:
                self._loop.remove_reader(self.fd)
            self._loop = None

    def expect_flip(self, crtc_id: int) -> asyncio.Future[FlipEvent]:
        """A future for the next flip event of crtc_id. One waiter per CRTC: there is at most one
        commit in flight per CRTC."""
        if crtc_id in self._waiters and not self._waiters[crtc_id].done():
            raise RuntimeError(f"CRTC {crtc_id} already has a flip in flight")
        loop = self._loop or asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters[crtc_id] = fut
        return fut

    def wait_events(self, crtc_ids: Iterable[int], timeout: float = 2.0) -> list[FlipEvent]:
        """Blocking wait (no event loop) until every CRTC in crtc_ids reported a flip."""
        want = set(crtc_ids)
        got: list[FlipEvent] = []
        deadline = time.monotonic() + timeout
        while want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no flip event for CRTC(s) {sorted(want)} within {timeout:.1f}s")
            if readable(self.fd, left):
                for ev in self.dispatch_events():
                    got.append(ev)
                    want.discard(ev.crtc_id)
        return got

    # -- lifetime
    def close(self) -> None:
        if self.fd < 0:
            return
        self.detach()
        for blob in self._mode_blobs.values():
            destroy_blob(self.fd, blob)
        self._mode_blobs.clear()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Card:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Card {self.path} {getattr(self, 'driver', '?')}>"


def _owner_group(path: str) -> str:
    import grp
    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return "unknown"


def list_cards(dri: str = "/dev/dri") -> list[str]:
    """Every /dev/dri/cardN, in numeric order."""
    try:
        names = [n for n in os.listdir(dri) if n.startswith("card") and n[4:].isdigit()]
    except FileNotFoundError:
        return []
    return [os.path.join(dri, n) for n in sorted(names, key=lambda n: int(n[4:]))]


__all__ = ["Card", "Connector", "Crtc", "Plane", "Encoder", "Property", "DumbBuffer", "Framebuffer",
           "FlipEvent", "list_cards", "KmsError"]
