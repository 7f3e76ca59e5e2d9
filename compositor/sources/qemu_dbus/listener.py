"""The listener object QEMU calls (`/org/qemu/Display1/Listener`): org.qemu.Display1.Listener and
org.qemu.Display1.Listener.Unix.Map, their argument types and replies. The source does the work."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dbus_fast.annotations import (
    DBusBool,
    DBusBytes,
    DBusInt32,
    DBusUInt32,
    DBusUInt64,
    DBusUnixFd,
)
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property

from compositor.sources.qemu_dbus.bus import LISTENER_IFACE, MAP_IFACE, DBusStrings

if TYPE_CHECKING:
    from compositor.sources.qemu_dbus.source import QemuDisplaySource


class _ListenerPart(ServiceInterface):
    """One interface of the listener object, tied to the listener connection it was exported on."""

    def __init__(self, name: str, source: QemuDisplaySource) -> None:
        super().__init__(name)
        self.source = source
        self.generation = source._generation

    def _do(self, method: str, fn: Callable[..., None], *args: Any, fd: int | None = None) -> None:
        self.source._call(self.generation, method, fn, *args, fd=fd)


class ListenerInterface(_ListenerPart):
    """org.qemu.Display1.Listener: the D-Bus face of a QemuDisplaySource (argument types and replies;
    the source does the work)."""

    def __init__(self, source: QemuDisplaySource) -> None:
        super().__init__(LISTENER_IFACE, source)

    @dbus_method(name="Scanout")
    def scanout(self, width: DBusUInt32, height: DBusUInt32, stride: DBusUInt32, pixman_format: DBusUInt32,
                data: DBusBytes):
        self._do("Scanout", self.source._scanout_pixels, width, height, stride, pixman_format, data)

    @dbus_method(name="Update")
    def update(self, x: DBusInt32, y: DBusInt32, width: DBusInt32, height: DBusInt32, stride: DBusUInt32,
               pixman_format: DBusUInt32, data: DBusBytes):
        self._do("Update", self.source._update_pixels, x, y, width, height, stride, pixman_format, data)

    @dbus_method(name="ScanoutDMABUF")
    def scanout_dmabuf(self, dmabuf: DBusUnixFd, width: DBusUInt32, height: DBusUInt32, stride: DBusUInt32,
                       fourcc: DBusUInt32, modifier: DBusUInt64, y0_top: DBusBool):
        self._do("ScanoutDMABUF", self.source._scanout_dmabuf, dmabuf, width, height, stride, fourcc,
                 modifier, y0_top, fd=dmabuf)

    @dbus_method(name="UpdateDMABUF")
    def update_dmabuf(self, x: DBusInt32, y: DBusInt32, width: DBusInt32, height: DBusInt32):
        self._do("UpdateDMABUF", self.source._update_current, "dmabuf", x, y, width, height)

    @dbus_method(name="Disable")
    def disable(self):
        self._do("Disable", self.source._disable)

    @dbus_method(name="MouseSet")
    def mouse_set(self, x: DBusInt32, y: DBusInt32, on: DBusInt32):
        self._do("MouseSet", self.source._mouse_set, x, y, on)

    @dbus_method(name="CursorDefine")
    def cursor_define(self, width: DBusInt32, height: DBusInt32, hot_x: DBusInt32, hot_y: DBusInt32,
                      data: DBusBytes):
        self._do("CursorDefine", self.source._cursor_define, width, height, hot_x, hot_y, data)

    @dbus_property(access=PropertyAccess.READ, name="Interfaces")
    def interfaces(self) -> DBusStrings:
        return [MAP_IFACE] if self.source.offer_map else []


class ListenerMapInterface(_ListenerPart):
    """org.qemu.Display1.Listener.Unix.Map: QEMU's surface shared as a memfd."""

    def __init__(self, source: QemuDisplaySource) -> None:
        super().__init__(MAP_IFACE, source)

    @dbus_method(name="ScanoutMap")
    def scanout_map(self, handle: DBusUnixFd, offset: DBusUInt32, width: DBusUInt32, height: DBusUInt32,
                    stride: DBusUInt32, pixman_format: DBusUInt32):
        self._do("ScanoutMap", self.source._scanout_map, handle, offset, width, height, stride, pixman_format,
                 fd=handle)

    @dbus_method(name="UpdateMap")
    def update_map(self, x: DBusInt32, y: DBusInt32, width: DBusInt32, height: DBusInt32):
        self._do("UpdateMap", self.source._update_current, "map", x, y, width, height)
