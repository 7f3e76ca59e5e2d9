"""QEMU's D-Bus display (`-display dbus`) as a guest source: any VM QEMU can show, zero copy where QEMU
hands out dma-bufs.

How QEMU's display speaks (interface description: QEMU's ui/dbus-display1.xml):

- The *display connection* reaches QEMU's objects: `/org/qemu/Display1/VM` (org.qemu.Display1.VM: Name,
  UUID, ConsoleIDs) and `/org/qemu/Display1/Console_N` (org.qemu.Display1.Console: Type, Width,
  Height, RegisterListener). It is either a private bus QEMU joined as `org.qemu`
  (`-display dbus,addr=ADDRESS`), or peer to peer (`-display dbus,p2p=yes`): a socket pair whose other
  end is handed to QEMU over QMP (`getfd`, then `add_client protocol=@dbus-display`). A p2p connection
  has no bus: no Hello, no names, no match rules (signals simply arrive).
- `RegisterListener(h)` takes one end of a second socket pair. On it QEMU is the D-Bus
  *authentication server* (G_DBUS_CONNECTION_FLAGS_AUTHENTICATION_SERVER, with a GUID) and the caller:
  we authenticate as client (EXTERNAL, NEGOTIATE_UNIX_FD) and serve `/org/qemu/Display1/Listener`.
  QEMU first reads the listener's properties (GetAll: `Interfaces`), and newer QEMUs use
  org.qemu.Display1.Listener.Unix.Map when it is listed there.
- QEMU then calls the listener. `ScanoutDMABUF(h, ...)` hands over a dma-buf (zero copy); after it,
  `UpdateDMABUF(x, y, w, h)` says the buffer changed, and QEMU blocks the guest's GL until we reply —
  so the reply is sent from the handler itself, before anything else, and its latency is measured.
  `ScanoutMap(h, offset, ...)` shares QEMU's surface memory (a memfd; QEMU versions with
  org.qemu.Display1.Listener.Unix.Map, not 7.2) and `UpdateMap` says what changed (QEMU waits for the
  ScanoutMap reply too). `Scanout` / `Update` carry the pixels themselves;
  they are written into a memfd of ours that the scanout pipeline copies from. `Disable` turns the
  display off (the slate); `CursorDefine` / `MouseSet` describe the pointer.
- A resize on the pixel path comes without a Scanout: QEMU only switches its surface and sends
  `Update`s of the new size, in bands (VGA text mode after SeaBIOS: 720x400 in 16-row bands). The new
  size is the console's Width/Height: the source follows the console's PropertiesChanged signal and,
  when an Update does not fit before that signal came, asks for Width/Height and holds the update
  until the answer.

Buffer identity: a dma-buf (or shared memfd) is known by its inode. QEMU sends a new fd with every
ScanoutDMABUF, also for a buffer it sent before (a guest flipping between two buffers); a known inode
with the same layout is the same Buffer (same id: the framebuffer cache imports it once) and the new
fd is closed. A few recent buffers are kept; older ones are handed back through `on_forget`.

Connection lifetime: `QemuDisplaySource.start()` runs a loop — connect, register, serve until either
connection closes (the VM went away: `on_blank` and `on_forget` for every buffer), then try again with
a growing delay. A source given an already connected socket cannot reconnect: it ends with `on_close`.

Input: `source.input` (a `QemuInput`, one per source, kept across reconnects) is the guest's
`compositor.input.sink.InputSink`. It sends evdev input as calls on the console object
(`/org/qemu/Display1/Console_N`, the source's console): keys as qnum numbers (compositor/input/qnum.py) to
org.qemu.Display1.Keyboard Press/Release; buttons as QEMU's InputButton numbers, wheel detents as a
press and a release of wheel-up/-down/-left/-right, positions (clamped to the console) and motion to
org.qemu.Display1.Mouse; touch to org.qemu.Display1.MultiTouch SendEvent. `input.absolute` is the
Mouse's IsAbsolute, read at connect and followed through PropertiesChanged. The console's `Interfaces`
property says which of the three it has (no property: a QEMU before 8.1, Keyboard and Mouse); what it
lacks is dropped. Calls are never awaited: each is handed to the connection with a callback for its
answer, at most MAX_INPUT_CALLS may be unanswered (beyond, input is dropped with one warning, and one
info line once QEMU answers again), and releases dropped meanwhile are sent first then.

The D-Bus library is dbus-fast (asyncio, fd passing). Its MessageBus only connects to bus addresses and
always greets a bus with Hello; `PeerBus` runs it over an already connected socket instead.

Modules: `bus` (paths, interface and error names, the connections), `listener` (the object QEMU
calls), `input` (QemuInput), `surface` (pixman formats, the pixel surface, what is scanned out),
`handler` (QemuFrame, QemuDisplayHandler) and `source` (QemuDisplaySource). Where the VM is,
`QemuTarget`, is compositor.sources.qemu_target: the policy reads it without loading any of this.
"""

from __future__ import annotations

from compositor.sources.qemu_dbus.bus import (
    CALL_TIMEOUT,
    CONSOLE_IFACE,
    ERROR_FAILED,
    ERROR_INVALID,
    ERROR_UNSUPPORTED,
    KEYBOARD_IFACE,
    LISTENER_IFACE,
    LISTENER_PATH,
    MAP_IFACE,
    MOUSE_IFACE,
    MULTITOUCH_IFACE,
    PROPERTIES_IFACE,
    ROOT,
    VM_IFACE,
    VM_PATH,
    DBusStrings,
    DisplayBus,
    PeerBus,
    console_path,
)
from compositor.sources.qemu_dbus.handler import QemuDisplayHandler, QemuDisplayHandlerDefaults, QemuFrame
from compositor.sources.qemu_dbus.input import (
    BUTTONS,
    LEGACY_INPUT_IFACES,
    MAX_INPUT_CALLS,
    MAX_WHEEL_STEPS,
    QBTN_EXTRA,
    QBTN_LEFT,
    QBTN_MIDDLE,
    QBTN_RIGHT,
    QBTN_SIDE,
    QBTN_WHEEL_DOWN,
    QBTN_WHEEL_LEFT,
    QBTN_WHEEL_RIGHT,
    QBTN_WHEEL_UP,
    TOUCH_TYPES,
    QemuInput,
)
from compositor.sources.qemu_dbus.listener import ListenerInterface, ListenerMapInterface
from compositor.sources.qemu_dbus.source import (
    LATENCY_WINDOW,
    MAX_HELD_UPDATE_BYTES,
    MAX_KEPT_BUFFERS,
    DisplayStats,
    QemuDisplaySource,
    wait_for,
)
from compositor.sources.qemu_dbus.surface import (
    PIXMAN_A8R8G8B8,
    PIXMAN_TO_DRM,
    PIXMAN_X8R8G8B8,
    UnsupportedFormat,
    pixman_to_fourcc,
)
from compositor.sources.qemu_target import BUS_NAME, QemuTarget

__all__ = [
    "BUS_NAME", "BUTTONS", "CALL_TIMEOUT", "CONSOLE_IFACE", "ERROR_FAILED", "ERROR_INVALID",
    "ERROR_UNSUPPORTED", "KEYBOARD_IFACE", "LATENCY_WINDOW", "LEGACY_INPUT_IFACES", "LISTENER_IFACE",
    "LISTENER_PATH", "MAP_IFACE", "MAX_HELD_UPDATE_BYTES", "MAX_INPUT_CALLS", "MAX_KEPT_BUFFERS",
    "MAX_WHEEL_STEPS", "MOUSE_IFACE", "MULTITOUCH_IFACE", "PIXMAN_A8R8G8B8", "PIXMAN_TO_DRM",
    "PIXMAN_X8R8G8B8", "PROPERTIES_IFACE", "QBTN_EXTRA", "QBTN_LEFT", "QBTN_MIDDLE", "QBTN_RIGHT",
    "QBTN_SIDE", "QBTN_WHEEL_DOWN", "QBTN_WHEEL_LEFT", "QBTN_WHEEL_RIGHT", "QBTN_WHEEL_UP", "ROOT",
    "TOUCH_TYPES", "VM_IFACE", "VM_PATH", "DBusStrings", "DisplayBus", "DisplayStats", "ListenerInterface",
    "ListenerMapInterface", "PeerBus", "QemuDisplayHandler", "QemuDisplayHandlerDefaults",
    "QemuDisplaySource", "QemuFrame", "QemuInput", "QemuTarget", "UnsupportedFormat", "console_path",
    "pixman_to_fourcc", "wait_for",
]
