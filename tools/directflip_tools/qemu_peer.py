"""A stand-in for QEMU's side of `-display dbus`, for tests, the lab and benchmarks.

It serves what QEMU serves — org.qemu.Display1.VM on /org/qemu/Display1/VM and
org.qemu.Display1.Console on /org/qemu/Display1/Console_0 — either peer to peer on a socket (where it
authenticates the client as QEMU does: it is the D-Bus authentication server) or on a bus as
`org.qemu`. When a listener registers it does what QEMU does with the listener's socket: answers the
RegisterListener call, authenticates as the server on the handed socket, reads the listener's
properties (GetAll: `Interfaces`), and from then on calls the listener's methods with real fds:
`Listener` wraps those calls and times each round trip (what QEMU waits for).

Command line (`python -m directflip_tools.qemu_peer`):

  serve --bus ADDRESS   own org.qemu on a bus and show frames: --on memfd (host), vgem or display
                        (dma-bufs from a DRM device), --mode dmabuf|map|pixels, --buffers 1|2
                        (1: one buffer drawn in place, announced once: only UpdateDMABUF follows)
  bench                 time UpdateDMABUF round trips against a QemuDisplaySource in this process,
                        the peer in a child process (median and p99 in microseconds, JSON)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import mmap
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid as uuid_mod
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any

import numpy as np
from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusDouble,
    DBusInt32,
    DBusSignature,
    DBusStr,
    DBusUInt16,
    DBusUInt32,
    DBusUInt64,
    DBusUnixFd,
)
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property

from compositor.formats import XRGB8888
from compositor.sources.qemu_dbus import (
    BUS_NAME,
    CONSOLE_IFACE,
    ERROR_INVALID,
    KEYBOARD_IFACE,
    LISTENER_IFACE,
    LISTENER_PATH,
    MAP_IFACE,
    MOUSE_IFACE,
    MULTITOUCH_IFACE,
    PIXMAN_X8R8G8B8,
    PROPERTIES_IFACE,
    VM_IFACE,
    VM_PATH,
    DBusStrings,
    DisplayBus,
    PeerBus,
    console_path,
)
from compositor.stats import percentile

log = logging.getLogger("directflip.qemu_peer")

DBusUInts = Annotated[list[int], DBusSignature("au")]

PEER_UUID = "5f3c0a4e-2b1d-4c6e-9f8a-7d2e1b0c9a34"


class VmInterface(ServiceInterface):
    def __init__(self, peer: QemuDisplayPeer) -> None:
        super().__init__(VM_IFACE)
        self.peer = peer

    @dbus_property(access=PropertyAccess.READ, name="Name")
    def name(self) -> DBusStr:
        return self.peer.name

    @dbus_property(access=PropertyAccess.READ, name="UUID")
    def uuid(self) -> DBusStr:
        return self.peer.uuid

    @dbus_property(access=PropertyAccess.READ, name="ConsoleIDs")
    def console_ids(self) -> DBusUInts:
        return [0]

    @dbus_property(access=PropertyAccess.READ, name="Interfaces")
    def interfaces(self) -> DBusStrings:
        return []


class ConsoleInterface(ServiceInterface):
    def __init__(self, peer: QemuDisplayPeer) -> None:
        super().__init__(CONSOLE_IFACE)
        self.peer = peer

    @dbus_method(name="RegisterListener")
    def register_listener(self, listener: DBusUnixFd):
        # Like QEMU: answer first, then run the handshake on the handed socket.
        self.peer._accept_listener(listener)

    @dbus_method(name="SetUIInfo")
    def set_ui_info(self, width_mm: DBusUInt16, height_mm: DBusUInt16, xoff: DBusInt32, yoff: DBusInt32,
                    width: DBusUInt32, height: DBusUInt32):
        self.peer.ui_info = (width_mm, height_mm, xoff, yoff, width, height)

    @dbus_property(access=PropertyAccess.READ, name="Label")
    def label(self) -> DBusStr:
        return self.peer.label

    @dbus_property(access=PropertyAccess.READ, name="Head")
    def head(self) -> DBusUInt32:
        return 0

    @dbus_property(access=PropertyAccess.READ, name="Type")
    def type(self) -> DBusStr:
        return "Graphic"

    @dbus_property(access=PropertyAccess.READ, name="Width")
    def width(self) -> DBusUInt32:
        return self.peer.width

    @dbus_property(access=PropertyAccess.READ, name="Height")
    def height(self) -> DBusUInt32:
        return self.peer.height

    @dbus_property(access=PropertyAccess.READ, name="DeviceAddress")
    def device_address(self) -> DBusStr:
        return "pci/0000/02.0"

    @dbus_property(access=PropertyAccess.READ, name="Interfaces")
    def interfaces(self) -> DBusStrings:
        return list(self.peer.console_interfaces)


# The console's input interfaces, as QEMU's ui/dbus-console.c answers them: every call is written down in
# peer.input_calls as (interface's last name, member, *arguments), also those QEMU would refuse.

class KeyboardInterface(ServiceInterface):
    def __init__(self, peer: QemuDisplayPeer) -> None:
        super().__init__(KEYBOARD_IFACE)
        self.peer = peer

    @dbus_method(name="Press")
    def press(self, keycode: DBusUInt32):
        self.peer._record(KEYBOARD_IFACE, "Press", keycode)

    @dbus_method(name="Release")
    def release(self, keycode: DBusUInt32):
        self.peer._record(KEYBOARD_IFACE, "Release", keycode)

    @dbus_property(access=PropertyAccess.READ, name="Modifiers")
    def modifiers(self) -> DBusUInt32:
        return self.peer.modifiers


class MouseInterface(ServiceInterface):
    def __init__(self, peer: QemuDisplayPeer) -> None:
        super().__init__(MOUSE_IFACE)
        self.peer = peer

    @dbus_method(name="Press")
    def press(self, button: DBusUInt32):
        self.peer._record(MOUSE_IFACE, "Press", button)

    @dbus_method(name="Release")
    def release(self, button: DBusUInt32):
        self.peer._record(MOUSE_IFACE, "Release", button)

    @dbus_method(name="SetAbsPosition")
    def set_abs_position(self, x: DBusUInt32, y: DBusUInt32):
        self.peer._record(MOUSE_IFACE, "SetAbsPosition", x, y)
        if not self.peer.absolute:
            raise DBusError(ERROR_INVALID, "Mouse is not absolute")
        if x >= self.peer.width or y >= self.peer.height:
            raise DBusError(ERROR_INVALID, "Invalid mouse position")

    @dbus_method(name="RelMotion")
    def rel_motion(self, dx: DBusInt32, dy: DBusInt32):
        self.peer._record(MOUSE_IFACE, "RelMotion", dx, dy)
        if self.peer.absolute:
            raise DBusError(ERROR_INVALID, "Mouse is not relative")

    @dbus_property(access=PropertyAccess.READ, name="IsAbsolute")
    def is_absolute(self) -> DBusBool:
        return self.peer.absolute


class MultiTouchInterface(ServiceInterface):
    def __init__(self, peer: QemuDisplayPeer) -> None:
        super().__init__(MULTITOUCH_IFACE)
        self.peer = peer

    @dbus_method(name="SendEvent")
    def send_event(self, kind: DBusUInt32, num_slot: DBusUInt64, x: DBusDouble, y: DBusDouble):
        self.peer._record(MULTITOUCH_IFACE, "SendEvent", kind, num_slot, x, y)
        if kind > 3:
            raise DBusError(ERROR_INVALID, "Invalid touch event kind")
        if num_slot >= self.peer.max_slots:
            raise DBusError(ERROR_INVALID, f"Unexpected touch slot number: {num_slot} >= "
                                           f"{self.peer.max_slots}")

    @dbus_property(access=PropertyAccess.READ, name="MaxSlots")
    def max_slots(self) -> DBusInt32:
        return self.peer.max_slots


INPUT_INTERFACES = {KEYBOARD_IFACE: KeyboardInterface, MOUSE_IFACE: MouseInterface,
                    MULTITOUCH_IFACE: MultiTouchInterface}


class Listener:
    """A registered listener as QEMU sees it: its connection and what it said it implements. Every
    call returns its round trip in ns and raises DBusError when the listener answered with an error."""

    def __init__(self, bus: PeerBus, interfaces: list[str]) -> None:
        self.bus = bus
        self.interfaces = interfaces

    @property
    def has_map(self) -> bool:
        return MAP_IFACE in self.interfaces

    async def call(self, member: str, signature: str, body: list[Any], fds: list[int] | None = None,
                   iface: str = LISTENER_IFACE) -> int:
        start = time.perf_counter_ns()
        reply = await self.bus.call(Message(path=LISTENER_PATH, interface=iface, member=member,
                                            signature=signature, body=body, unix_fds=fds or []))
        elapsed = time.perf_counter_ns() - start
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
        return elapsed

    async def scanout(self, width: int, height: int, stride: int, pixman: int, data: bytes) -> int:
        return await self.call("Scanout", "uuuuay", [width, height, stride, pixman, data])

    async def update(self, x: int, y: int, width: int, height: int, stride: int, pixman: int,
                     data: bytes) -> int:
        return await self.call("Update", "iiiiuuay", [x, y, width, height, stride, pixman, data])

    async def scanout_dmabuf(self, fd: int, width: int, height: int, stride: int, fourcc: int,
                             modifier: int = 0, y0_top: bool = True) -> int:
        return await self.call("ScanoutDMABUF", "huuuutb", [0, width, height, stride, fourcc, modifier,
                                                            y0_top], fds=[fd])

    async def update_dmabuf(self, x: int, y: int, width: int, height: int) -> int:
        return await self.call("UpdateDMABUF", "iiii", [x, y, width, height])

    async def scanout_map(self, fd: int, offset: int, width: int, height: int, stride: int,
                          pixman: int) -> int:
        return await self.call("ScanoutMap", "huuuuu", [0, offset, width, height, stride, pixman], fds=[fd],
                               iface=MAP_IFACE)

    async def update_map(self, x: int, y: int, width: int, height: int) -> int:
        return await self.call("UpdateMap", "iiii", [x, y, width, height], iface=MAP_IFACE)

    async def disable(self) -> int:
        return await self.call("Disable", "", [])

    async def mouse_set(self, x: int, y: int, on: int) -> int:
        return await self.call("MouseSet", "iii", [x, y, on])

    async def cursor_define(self, width: int, height: int, hot_x: int, hot_y: int, data: bytes) -> int:
        return await self.call("CursorDefine", "iiiiay", [width, height, hot_x, hot_y, data])

    def close(self) -> None:
        if self.bus.connected:
            self.bus.disconnect()


@dataclass
class QemuDisplayPeer:
    """QEMU's display objects with one graphic console, served peer to peer or on a bus.

    Input: the console serves the interfaces named in `console_interfaces` (its Interfaces property
    says so too) and writes every input call down in `input_calls`. `set_absolute()` changes the
    Mouse's IsAbsolute (with PropertiesChanged, as QEMU does when the guest's pointer device changes);
    `stop_answering_input()` keeps input calls unanswered (a stuck VM) until `answer_input()`."""

    name: str = "peer-vm"
    uuid: str = PEER_UUID
    width: int = 640
    height: int = 480
    label: str = "VGA"
    ui_info: tuple | None = None
    console_interfaces: list[str] = field(
        default_factory=lambda: [KEYBOARD_IFACE, MOUSE_IFACE, MULTITOUCH_IFACE])
    absolute: bool = False  # the Mouse's IsAbsolute: QEMU's with a PS/2 mouse only
    modifiers: int = 0
    max_slots: int = 10  # QEMU's INPUT_EVENT_SLOTS_MAX
    input_calls: list[tuple] = field(default_factory=list)
    answering_input: bool = True
    listeners: list[Listener] = field(default_factory=list)
    buses: list[MessageBus] = field(default_factory=list)
    _registered: asyncio.Event = field(default_factory=asyncio.Event)
    _console: ConsoleInterface | None = None
    _tasks: set = field(default_factory=set)
    _mice: list[MouseInterface] = field(default_factory=list)
    _held_input: list[tuple[MessageBus, Message]] = field(default_factory=list)

    def _export(self, bus: MessageBus) -> None:
        bus.export(VM_PATH, VmInterface(self))
        self._console = ConsoleInterface(self)
        bus.export(console_path(0), self._console)
        for name in self.console_interfaces:
            interface = INPUT_INTERFACES[name](self)
            bus.export(console_path(0), interface)
            if isinstance(interface, MouseInterface):
                self._mice.append(interface)
        bus.add_message_handler(partial(self._hold_input, bus))
        self.buses.append(bus)

    def _record(self, iface: str, member: str, *args: Any) -> None:
        self.input_calls.append((iface.rsplit(".", 1)[-1], member, *args))

    def _hold_input(self, bus: MessageBus, msg: Message) -> bool:
        """While input is not answered: write an input call down and keep it (True: handled, no reply)."""
        if (self.answering_input or msg.message_type != MessageType.METHOD_CALL
                or msg.interface not in INPUT_INTERFACES or msg.path != console_path(0)):
            return False
        self._record(msg.interface, msg.member, *msg.body)
        self._held_input.append((bus, msg))
        return True

    def stop_answering_input(self) -> None:
        """Input calls from now on are written down but not answered (a VM whose QEMU is stuck)."""
        self.answering_input = False

    def answer_input(self) -> int:
        """Answer every held input call (successfully) and answer new ones again; how many were held."""
        self.answering_input = True
        held, self._held_input = self._held_input, []
        for bus, msg in held:
            if bus.connected:
                bus.send(Message.new_method_return(msg))
        return len(held)

    @property
    def held_input(self) -> int:
        return len(self._held_input)

    def set_absolute(self, absolute: bool) -> None:
        """Change the Mouse's IsAbsolute and signal it (QEMU: a tablet appears or goes)."""
        self.absolute = absolute
        for mouse in self._mice:
            mouse.emit_properties_changed({"IsAbsolute": absolute})

    async def serve_peer(self, sock: socket.socket) -> PeerBus:
        """Serve one client peer to peer on `sock` (as QEMU does after QMP add_client)."""
        bus = PeerBus(sock)
        self._export(bus)
        return await bus.start(server_guid=uuid_mod.uuid4().hex)

    async def serve_bus(self, address: str, bus_name: str = BUS_NAME) -> MessageBus:
        """Join the bus at `address` as `bus_name` (as QEMU does with -display dbus,addr=...)."""
        bus = await DisplayBus(bus_address=address, negotiate_unix_fd=True).connect()
        self._export(bus)
        await bus.request_name(bus_name)
        return bus

    def _accept_listener(self, fd: int) -> None:
        task = asyncio.get_running_loop().create_task(self._handshake_listener(fd))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake_listener(self, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        bus = PeerBus(sock)
        try:
            await bus.start(server_guid=uuid_mod.uuid4().hex)
            reply = await bus.call(Message(path=LISTENER_PATH, interface=PROPERTIES_IFACE, member="GetAll",
                                           signature="s", body=[LISTENER_IFACE]))
        except Exception as exc:
            log.warning("listener handshake failed: %s", exc)
            if bus.connected:
                bus.disconnect()
            return
        interfaces: list[str] = []
        if reply.message_type == MessageType.METHOD_RETURN:
            value = reply.body[0].get("Interfaces")
            interfaces = list(value.value) if isinstance(value, Variant) else []
        self.listeners.append(Listener(bus, interfaces))
        self._registered.set()

    async def listener(self, timeout: float = 10.0, index: int = -1) -> Listener:
        """The listener registered last (waiting for one)."""
        await asyncio.wait_for(self._registered.wait(), timeout)
        return self.listeners[index]

    async def next_listener(self, timeout: float = 10.0) -> Listener:
        """Wait for a listener registered after this call."""
        known = len(self.listeners)
        deadline = time.monotonic() + timeout
        while len(self.listeners) <= known:
            if time.monotonic() > deadline:
                raise TimeoutError("no listener registered")
            await asyncio.sleep(0.01)
        return self.listeners[-1]

    def resize(self, width: int, height: int) -> None:
        """Change the console's size and signal it, as QEMU does on a surface switch (no Scanout)."""
        self.width, self.height = width, height
        if self._console is not None:
            self._console.emit_properties_changed({"Width": width, "Height": height})

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
        for bus in self.buses:
            if bus.connected:
                bus.disconnect()
        self.listeners.clear()
        self.buses.clear()
        self._mice.clear()
        self._held_input.clear()


# --------------------------------------------------------------------------------- buffers

class MemfdBuffer:
    """An XRGB8888 buffer in a memfd, mapped: the host's stand-in for a dma-buf."""

    def __init__(self, width: int, height: int, name: str = "peer") -> None:
        self.width, self.height = width, height
        self.stride = width * 4
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.stride * height)
        self.map = mmap.mmap(self.fd, self.stride * height)
        self.view = np.ndarray((height, width, 4), np.uint8, buffer=self.map)

    def close(self) -> None:
        self.view = None
        self.map.close()
        os.close(self.fd)


def draw(view: np.ndarray, n: int) -> None:
    """A picture that changes every frame: a gradient and a bar 8 pixels further each frame."""
    height, width = view.shape[:2]
    view[:, :, 0] = (np.arange(width, dtype=np.uint32) * 255 // max(1, width - 1)).astype(np.uint8)[None, :]
    view[:, :, 1] = (np.arange(height, dtype=np.uint32) * 255 // max(1, height - 1)).astype(np.uint8)[:, None]
    view[:, :, 2] = 96
    view[:, :, 3] = 255
    x = (n * 8) % max(1, width - 16)
    view[:, x:x + 16, :3] = 255


Slot = tuple[int, int, np.ndarray, Any]  # (fd, stride, view, owner: a MemfdBuffer or a swapchain slot)


def _draw_into(slot: Slot, n: int) -> None:
    fd, _stride, view, owner = slot
    if isinstance(owner, MemfdBuffer):
        draw(view, n)
        return
    from directflip_tools.synthetic import cpu_write

    with cpu_write(fd):  # a real dma-buf: let the exporter flush its caches
        draw(view, n)


async def _send(listener, args: argparse.Namespace, slot: Slot, index: int, current: int | None) -> int:
    """Hand frame `slot` to QEMU's listener the way --mode says: the scanout once per buffer change,
    then an update. Returns the buffer now scanned out."""
    fd, stride, view, _owner = slot
    width, height = args.width, args.height
    if args.mode == "dmabuf":
        if current != index:
            await listener.scanout_dmabuf(fd, width, height, stride, XRGB8888)
        await listener.update_dmabuf(0, 0, width, height)
    elif args.mode == "map":
        if current != index:
            await listener.scanout_map(fd, 0, width, height, stride, PIXMAN_X8R8G8B8)
        await listener.update_map(0, 0, width, height)
    else:
        data = bytes(np.ascontiguousarray(view))
        await listener.scanout(width, height, width * 4, PIXMAN_X8R8G8B8, data)
    return index


async def _flip_to(peer: QemuDisplayPeer, listener, slots: list[Slot], args: argparse.Namespace) -> None:
    """Frames to one listener at --rate until it goes away; then wait for the next one."""
    n, current = 0, None
    try:
        while True:
            index = n % len(slots)
            _draw_into(slots[index], n)
            current = await _send(listener, args, slots[index], index, current)
            n += 1
            await asyncio.sleep(1 / args.rate)
    except (DBusError, EOFError, OSError, ConnectionError) as exc:
        log.info("listener gone (%s); waiting for the next one", exc)
        peer.listeners.remove(listener)
        if not peer.listeners:
            peer._registered.clear()


async def _show_frames(peer: QemuDisplayPeer, args: argparse.Namespace) -> None:
    width, height = args.width, args.height
    peer.width, peer.height = width, height
    slots: list[Slot] = []
    card = swapchain = None
    if args.on == "memfd":
        for i in range(args.buffers):
            buf = MemfdBuffer(width, height, f"peer-{i}")
            slots.append((buf.fd, buf.stride, buf.view, buf))
    else:
        from compositor.kms import Card
        from directflip_tools.synthetic import Swapchain, find_card

        card = Card(find_card(args.on), kms=False)
        swapchain = Swapchain(card, width, height, args.buffers, name=peer.name)
        for slot in swapchain.slots.values():
            slots.append((slot.fd, slot.pitch, slot.view, slot))
    try:
        while True:
            await _flip_to(peer, await peer.listener(timeout=3600), slots, args)
    finally:
        if swapchain is not None:
            swapchain.close()
        if card is not None:
            card.close()
        for _, _, _, owner in slots:
            if isinstance(owner, MemfdBuffer):
                owner.close()


async def _serve(args: argparse.Namespace) -> int:
    peer = QemuDisplayPeer(name=args.name)
    await peer.serve_bus(args.bus)
    log.info("serving %s as %s on %s", args.name, BUS_NAME, args.bus)
    await _show_frames(peer, args)
    return 0


# --------------------------------------------------------------------------------- bench

async def _bench_child(fd: int, calls: int, width: int, height: int) -> dict[str, Any]:
    peer = QemuDisplayPeer(width=width, height=height)
    await peer.serve_peer(socket.socket(fileno=fd))
    listener = await peer.listener()
    buf = MemfdBuffer(width, height)
    draw(buf.view, 0)
    await listener.scanout_dmabuf(buf.fd, width, height, buf.stride, XRGB8888)
    for _ in range(min(100, calls)):  # warm up
        await listener.update_dmabuf(0, 0, width, height)
    times = [await listener.update_dmabuf(0, 0, width, height) for _ in range(calls)]
    peer.close()
    buf.close()
    return {"calls": calls, "median_us": statistics.median(times) / 1000,
            "p99_us": percentile(times, 0.99) / 1000, "min_us": min(times) / 1000}


async def _bench(args: argparse.Namespace) -> int:
    from compositor.sources.qemu_dbus import QemuDisplayHandlerDefaults, QemuDisplaySource, QemuTarget

    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-m", "directflip_tools.qemu_peer", "bench-child",
                              "--fd", str(theirs.fileno()), "--calls", str(args.calls)],
                             pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE)
    theirs.close()

    source = QemuDisplaySource("bench", QemuTarget(sock=ours), QemuDisplayHandlerDefaults())
    source.start()
    loop = asyncio.get_running_loop()
    out, _ = await loop.run_in_executor(None, child.communicate)
    source.close()
    stats = source.stats
    result = {"peer_round_trip": json.loads(out),
              "source_handler_us": {"median": stats.reply_us("UpdateDMABUF", 0.5),
                                    "p99": stats.reply_us("UpdateDMABUF", 0.99)}}
    print(json.dumps(result, indent=2))
    return child.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m directflip_tools.qemu_peer",
                                     description="A stand-in for QEMU's -display dbus.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="own org.qemu on a bus and show frames")
    serve.add_argument("--bus", required=True, help="D-Bus address (unix:path=...)")
    serve.add_argument("--name", default="peer-vm")
    serve.add_argument("--on", default="memfd", help="memfd, vgem, display or a /dev/dri path")
    serve.add_argument("--mode", choices=("dmabuf", "map", "pixels"), default="dmabuf")
    serve.add_argument("--buffers", type=int, choices=(1, 2), default=2)
    serve.add_argument("--width", type=int, default=640)
    serve.add_argument("--height", type=int, default=480)
    serve.add_argument("--rate", type=float, default=30.0)
    bench = sub.add_parser("bench", help="time UpdateDMABUF replies")
    bench.add_argument("--calls", type=int, default=1000)
    child = sub.add_parser("bench-child")
    child.add_argument("--fd", type=int, required=True)
    child.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.command.startswith("bench") else logging.INFO,
                        format="%(name)s: %(message)s")
    if args.command == "serve":
        return asyncio.run(_serve(args))
    if args.command == "bench":
        return asyncio.run(_bench(args))
    print(json.dumps(asyncio.run(_bench_child(args.fd, args.calls, 640, 480))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
