"""Input to a QEMU D-Bus display (`QemuDisplaySource.input`) against the stand-in for QEMU over real
D-Bus connections: socket pairs peer to peer, and a private dbus-daemon for a VM that restarts."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket

import pytest
from evdev import ecodes as e

from compositor.sources.qemu_dbus import (
    KEYBOARD_IFACE,
    MAX_INPUT_CALLS,
    MOUSE_IFACE,
    QBTN_EXTRA,
    QBTN_LEFT,
    QBTN_RIGHT,
    QBTN_SIDE,
    QBTN_WHEEL_DOWN,
    QBTN_WHEEL_LEFT,
    QBTN_WHEEL_RIGHT,
    QBTN_WHEEL_UP,
    QemuDisplayHandlerDefaults,
    QemuDisplaySource,
    QemuTarget,
    wait_for,
)
from directflip_tools.qemu_peer import QemuDisplayPeer

LOGGER = "directflip.qemu_dbus"


class Handler(QemuDisplayHandlerDefaults):
    """The daemon's side, as little of it as the display needs."""

    def on_forget(self, source, buffer) -> None:
        buffer.close()

    def on_close(self, source, reason: str) -> None:
        for buffer in source.buffers.values():
            buffer.close()


def run(coro, timeout: float = 30.0):
    async def bounded():
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            await asyncio.sleep(0.02)  # let closed connections' callbacks run before the loop goes
    return asyncio.run(bounded())


@pytest.fixture(autouse=True)
def collect_garbage():
    """As in test_qemu_dbus.py: a future failed by a closing connection is collected now, not inside a
    later test's import."""
    yield
    gc.collect()


async def connected(name: str = "vm", **peer_args) -> tuple[QemuDisplayPeer, QemuDisplaySource]:
    ours, theirs = socket.socketpair()
    peer = QemuDisplayPeer(width=64, height=32, **peer_args)
    source = QemuDisplaySource(name, QemuTarget(sock=ours), Handler())
    source.start()
    await peer.serve_peer(theirs)
    await peer.listener()
    assert await wait_for(lambda: source.state == "connected", 5)
    return peer, source


async def settled(peer: QemuDisplayPeer, source: QemuDisplaySource, calls: int) -> list[tuple]:
    """The peer's input calls once `calls` of them came and the source has every answer."""
    assert await wait_for(lambda: len(peer.input_calls) >= calls and source.input.outstanding == 0, 5), (
        peer.input_calls, source.input.status())
    return peer.input_calls


def test_keys_arrive_as_qnum_presses_and_releases_in_order(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    async def body():
        peer, source = await connected()
        sink = source.input
        assert sink.connected and sink.status()["keyboard"]
        for code, down in [(e.KEY_LEFTSHIFT, True), (e.KEY_A, True), (e.KEY_A, False),
                           (e.KEY_HANGEUL, True),  # no qnum: dropped, said at debug level
                           (e.KEY_LEFTSHIFT, False), (e.KEY_KPENTER, True), (e.KEY_KPENTER, False),
                           (e.KEY_RIGHTALT, True), (e.KEY_RIGHTALT, False)]:
            sink.key(code, down)
        calls = await settled(peer, source, 8)
        assert calls == [("Keyboard", "Press", 0x2a), ("Keyboard", "Press", 0x1e),
                         ("Keyboard", "Release", 0x1e), ("Keyboard", "Release", 0x2a),
                         ("Keyboard", "Press", 0x9c), ("Keyboard", "Release", 0x9c),
                         ("Keyboard", "Press", 0xb8), ("Keyboard", "Release", 0xb8)]
        assert (sink.sent, sink.answered, sink.refused, sink.dropped) == (8, 8, 0, 0)
        assert any("KEY_HANGEUL has no QEMU key number" in r.message for r in caplog.records)
        assert source.status()["input"]["sent"] == 8
        peer.close()
    run(body())


def test_buttons_wheel_positions_and_touch_arrive():
    async def body():
        peer, source = await connected(absolute=True, max_slots=2)
        sink = source.input
        assert sink.absolute  # read at connect
        sink.button(e.BTN_LEFT, True)
        sink.button(e.BTN_LEFT, False)
        sink.button(e.BTN_RIGHT, True)
        sink.button(e.BTN_RIGHT, False)
        sink.button(e.BTN_SIDE, True)
        sink.button(e.BTN_FORWARD, True)
        sink.button(e.BTN_TASK, True)  # QEMU has no such button: dropped
        sink.wheel(0, 2)  # two detents away from the user
        sink.wheel(0, -1)
        sink.wheel(1, 0)
        sink.wheel(-1, 0)
        sink.pointer_abs(10, 20)
        sink.pointer_abs(1000, -5)  # past the 64x32 console: its edge (QEMU refuses what is outside)
        sink.touch("down", 1, 5, 6)
        sink.touch("motion", 1, 7, 8)
        sink.touch("up", 1, 7, 8)
        sink.touch("down", 2, 1, 1)  # the console has slots 0 and 1 only: dropped
        sink.touch("down", 0, 99, 40)  # onto the console's edge, as the pointer
        sink.touch("cancel", 0, 99, 40)
        wheel = {"up": QBTN_WHEEL_UP, "down": QBTN_WHEEL_DOWN, "right": QBTN_WHEEL_RIGHT,
                 "left": QBTN_WHEEL_LEFT}
        expected = [("Mouse", "Press", QBTN_LEFT), ("Mouse", "Release", QBTN_LEFT),
                    ("Mouse", "Press", QBTN_RIGHT), ("Mouse", "Release", QBTN_RIGHT),
                    ("Mouse", "Press", QBTN_SIDE), ("Mouse", "Press", QBTN_EXTRA)]
        for direction in ("up", "up", "down", "right", "left"):
            expected += [("Mouse", "Press", wheel[direction]), ("Mouse", "Release", wheel[direction])]
        expected += [("Mouse", "SetAbsPosition", 10, 20), ("Mouse", "SetAbsPosition", 63, 0)]
        touch = "MultiTouch", "SendEvent"  # kind (begin 0, update 1, end 2, cancel 3), slot, x, y
        expected += [(*touch, 0, 1, 5.0, 6.0), (*touch, 1, 1, 7.0, 8.0), (*touch, 2, 1, 7.0, 8.0),
                     (*touch, 0, 0, 63.0, 31.0), (*touch, 3, 0, 63.0, 31.0)]
        assert await settled(peer, source, len(expected)) == expected
        assert sink.refused == 0  # QEMU took every one of them
        assert (QBTN_LEFT, QBTN_RIGHT, QBTN_WHEEL_UP, QBTN_WHEEL_DOWN, QBTN_SIDE, QBTN_EXTRA,
                QBTN_WHEEL_LEFT, QBTN_WHEEL_RIGHT) == (0, 2, 3, 4, 5, 6, 7, 8)  # QEMU's InputButton
        peer.close()
    run(body())


def test_absolute_follows_the_mouses_is_absolute(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def body():
        peer, source = await connected(absolute=False)
        sink = source.input
        assert not sink.absolute
        sink.pointer_rel(5, -3)
        sink.pointer_rel(0, 0)  # nothing moved: nothing sent
        assert await settled(peer, source, 1) == [("Mouse", "RelMotion", 5, -3)]

        peer.set_absolute(True)  # a tablet appeared: PropertiesChanged on the console's Mouse
        assert await wait_for(lambda: sink.absolute, 5)
        sink.pointer_abs(30, 12)
        sink.pointer_rel(1, 1)  # too late: QEMU refuses it, the sink counts that and goes on
        calls = await settled(peer, source, 3)
        assert calls[1:] == [("Mouse", "SetAbsPosition", 30, 12), ("Mouse", "RelMotion", 1, 1)]
        assert sink.refused == 1

        peer.set_absolute(False)
        assert await wait_for(lambda: not sink.absolute, 5)
        assert [r.message for r in caplog.records if "pointer is now" in r.message] == [
            "vm: the guest's pointer is now absolute", "vm: the guest's pointer is now relative"]
        peer.close()
    run(body())


def test_a_qemu_that_stops_answering_costs_bounded_calls_and_one_warning(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def body():
        stuck_peer, stuck = await connected("stuck-vm")
        other_peer, other = await connected("other-vm")
        stuck_peer.stop_answering_input()

        stuck.input.key(e.KEY_LEFTCTRL, True)  # held down in the guest when QEMU stops answering
        for i in range(200):
            stuck.input.key(e.KEY_A, i % 2 == 0)  # each call returns at once; most are dropped
            other.input.key(e.KEY_B, i % 2 == 0)
            if i % 8 == 7:
                await asyncio.sleep(0.002)  # typing speed, not one burst: the other VM answers meanwhile
        stuck.input.key(e.KEY_LEFTCTRL, False)  # dropped: owed to the guest
        assert stuck.input.outstanding == MAX_INPUT_CALLS and stuck.input.stalled
        assert stuck.input.dropped == 201 - (MAX_INPUT_CALLS - 1)
        assert await wait_for(lambda: stuck_peer.held_input == MAX_INPUT_CALLS, 5)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "stuck-vm" in warnings[0].message, [r.message for r in warnings]

        # The other VM's input went on, every event of it.
        calls = await settled(other_peer, other, 200)
        assert calls[:2] == [("Keyboard", "Press", 0x30), ("Keyboard", "Release", 0x30)]
        assert len(calls) == 200 and other.input.dropped == 0 and not other.input.stalled

        # QEMU answers again: input flows, and the releases it missed come first.
        assert stuck_peer.answer_input() == MAX_INPUT_CALLS
        assert await wait_for(lambda: not stuck.input.stalled and stuck.input.outstanding == 0, 5)
        calls = stuck_peer.input_calls
        assert calls[0] == ("Keyboard", "Press", 0x1d)
        assert calls[MAX_INPUT_CALLS:] == [("Keyboard", "Release", 0x1e), ("Keyboard", "Release", 0x1d)]
        infos = [r.message for r in caplog.records if "answers input calls again" in r.message]
        assert len(infos) == 1 and infos[0].startswith("stuck-vm:")
        stuck.input.key(e.KEY_C, True)
        assert (await settled(stuck_peer, stuck, MAX_INPUT_CALLS + 3))[-1] == ("Keyboard", "Press", 0x2e)
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        stuck_peer.close()
        other_peer.close()
    run(body())
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_console_without_keyboard_and_mouse_takes_no_input(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def body():
        peer, source = await connected(console_interfaces=[])
        sink = source.input
        sink.key(e.KEY_A, True)
        sink.button(e.BTN_LEFT, True)
        sink.wheel(0, 1)
        sink.pointer_abs(1, 1)
        sink.pointer_rel(1, 1)
        sink.touch("down", 0, 1, 1)
        assert (sink.sent, sink.outstanding, sink.absolute) == (0, 0, False)
        lines = [r.message for r in caplog.records if "no Keyboard or Mouse" in r.message]
        assert lines == ["vm: the console has no Keyboard or Mouse interface: input to this guest is dropped"]
        await asyncio.sleep(0.05)
        assert peer.input_calls == []
        peer.close()
    run(body())


def test_only_a_keyboard_still_types():
    async def body():
        peer, source = await connected(console_interfaces=[KEYBOARD_IFACE])
        source.input.button(e.BTN_LEFT, True)
        source.input.key(e.KEY_Q, True)
        assert await settled(peer, source, 1) == [("Keyboard", "Press", 0x10)]
        assert MOUSE_IFACE not in peer.console_interfaces
        peer.close()
    run(body())


# ------------------------------------------------------------------------------------ reconnecting


def test_input_goes_to_the_vm_that_came_back(private_bus):
    async def body():
        source = QemuDisplaySource("vm", QemuTarget(bus=private_bus), Handler(), retry_initial=0.05,
                                   retry_max=0.2)
        source.start()
        sink = source.input
        sink.key(e.KEY_A, True)  # no VM yet: dropped, quietly
        assert not sink.connected and sink.dropped == 1

        first = QemuDisplayPeer(name="run-1", width=64, height=32)
        await first.serve_bus(private_bus)
        assert await wait_for(lambda: source.state == "connected", 5)
        sink.key(e.KEY_A, True)
        assert await settled(first, source, 1) == [("Keyboard", "Press", 0x1e)]
        first.set_absolute(True)  # over the bus: the source's match rule brings the signal
        assert await wait_for(lambda: sink.absolute, 5)
        first.stop_answering_input()
        sink.key(e.KEY_A, False)
        assert await wait_for(lambda: first.held_input == 1, 5) and sink.outstanding == 1
        first.close()  # the VM stops with a call unanswered
        assert await wait_for(lambda: not sink.connected, 5)

        second = QemuDisplayPeer(name="run-2", width=64, height=32, absolute=False)
        await second.serve_bus(private_bus)
        assert await wait_for(lambda: source.state == "connected" and source.vm_name == "run-2", 5)
        assert not sink.absolute and sink.outstanding == 0 and not sink.stalled
        sink.key(e.KEY_B, True)
        sink.pointer_rel(2, 3)
        assert await settled(second, source, 2) == [("Keyboard", "Press", 0x30), ("Mouse", "RelMotion", 2, 3)]
        assert first.input_calls == [("Keyboard", "Press", 0x1e), ("Keyboard", "Release", 0x1e)]
        source.close()
        second.close()
    run(body())
