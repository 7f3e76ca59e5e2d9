"""The guest's input through QEMU's display (`QemuInput`, a QemuDisplaySource's `input`): evdev keys,
buttons, wheel, pointer and touch as calls on the console's org.qemu.Display1.Keyboard, .Mouse and
.MultiTouch interfaces, never awaited and bounded in number."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from dbus_fast import DBusError, Message, MessageType
from dbus_fast.aio import MessageBus

from compositor.input.qnum import key_name, qnum
from compositor.input.sink import TOUCH_KINDS
from compositor.sources.qemu_dbus.bus import (
    KEYBOARD_IFACE,
    MOUSE_IFACE,
    MULTITOUCH_IFACE,
    describe_error,
    variant_value,
)

if TYPE_CHECKING:
    from compositor.sources.qemu_dbus.source import QemuDisplaySource

log = logging.getLogger("directflip.qemu_dbus")

# What a console without the Interfaces property (QEMU before 8.1, which added it with MultiTouch)
# serves: Keyboard and Mouse were there from the first -display dbus.
LEGACY_INPUT_IFACES = (KEYBOARD_IFACE, MOUSE_IFACE)

MAX_INPUT_CALLS = 64  # input calls QEMU has not answered yet, per source; beyond this, input is dropped
MAX_WHEEL_STEPS = 16  # detents sent for one wheel() call: a runaway value must not flood the guest

# QEMU's InputButton (qapi/ui.json), the numbers org.qemu.Display1.Mouse's Press/Release take.
QBTN_LEFT, QBTN_MIDDLE, QBTN_RIGHT = 0, 1, 2
QBTN_WHEEL_UP, QBTN_WHEEL_DOWN = 3, 4
QBTN_SIDE, QBTN_EXTRA = 5, 6
QBTN_WHEEL_LEFT, QBTN_WHEEL_RIGHT = 7, 8  # later additions: see QemuInput.wheel

# evdev BTN_* (linux/input-event-codes.h) → InputButton. Thumb buttons come as BTN_SIDE/BTN_EXTRA from
# most mice and as BTN_BACK/BTN_FORWARD from some: both pairs are back/forward to the guest.
BUTTONS: dict[int, int] = {
    0x110: QBTN_LEFT,  # BTN_LEFT
    0x111: QBTN_RIGHT,  # BTN_RIGHT
    0x112: QBTN_MIDDLE,  # BTN_MIDDLE
    0x113: QBTN_SIDE,  # BTN_SIDE
    0x114: QBTN_EXTRA,  # BTN_EXTRA
    0x115: QBTN_EXTRA,  # BTN_FORWARD
    0x116: QBTN_SIDE,  # BTN_BACK
}

# InputSink touch kinds → QEMU's InputMultiTouchType (qapi/ui.json): begin, update, end, cancel.
TOUCH_TYPES: dict[str, int] = {"down": 0, "motion": 1, "up": 2, "cancel": 3}
_TOUCH_END = TOUCH_TYPES["up"]

_INT32 = (-(1 << 31), (1 << 31) - 1)
_UINT32_MAX = (1 << 32) - 1


@dataclass
class _InputLink:
    """Input's view of one display connection: where the calls go, what the console offers, and how
    many calls QEMU has not answered yet. A reconnect makes a new one; answers that come back on an old
    one only settle its own count."""

    bus: MessageBus
    dest: str | None
    path: str
    keyboard: bool
    mouse: bool
    touch: bool
    max_slots: int
    horizontal_wheel: bool
    outstanding: int = 0


_Call = tuple[str, str, str, list]  # interface, member, signature, body


class QemuInput:
    """The InputSink of a QemuDisplaySource (`source.input`): evdev input as calls on the console
    object's org.qemu.Display1.Keyboard, .Mouse and .MultiTouch interfaces.

    Every method returns at once: the call is handed to the connection's writer and its answer handled
    in a callback, never awaited. At most `max_calls` calls may wait for QEMU's answer; beyond that,
    input is dropped (one warning) until QEMU has answered half of them (one info line), so a stuck VM
    can neither hold up the compositor nor make it queue without end. A release dropped that way is
    owed: it is sent first once QEMU answers again, so no key, button or touch stays down in the guest.
    Without a connection (the VM not there yet, or gone) input is dropped silently."""

    def __init__(self, source: QemuDisplaySource, max_calls: int = MAX_INPUT_CALLS) -> None:
        self.source = source
        self.max_calls = max_calls
        self.modifiers = 0  # the Keyboard's Modifiers property (Scroll 1, Num 2, Caps 4), for status
        self.sent = 0
        self.answered = 0
        self.refused = 0  # answers that were errors (say, a relative motion just after the mode changed)
        self.dropped = 0
        self._link: _InputLink | None = None
        self._absolute = False
        self._absolute_changes = 0  # IsAbsolute signals seen: a late GetAll answer must not undo one
        self._stalled = False
        self._stall_drops = 0
        # What the guest holds down (a key, a button, a touch contact) → the call that lets go of it;
        # and those of them whose release was dropped.
        self._down: dict[tuple[str, int], _Call] = {}
        self._owed: dict[tuple[str, int], _Call] = {}
        self._told_interfaces: str | None = None

    # --- InputSink -----------------------------------------------------------------------------------

    @property
    def absolute(self) -> bool:
        return self._absolute

    def key(self, code: int, down: bool) -> None:
        number = qnum(code)
        if number is None:
            log.debug("%s: %s has no QEMU key number; dropped", self.source.name, key_name(code))
            return
        link = self._link
        if link is not None and not link.keyboard:
            return
        member = "Press" if down else "Release"
        self._press_or_release(("key", number), down, (KEYBOARD_IFACE, member, "u", [number]),
                               (KEYBOARD_IFACE, "Release", "u", [number]))

    def button(self, code: int, down: bool) -> None:
        button = BUTTONS.get(code)
        if button is None:
            log.debug("%s: button %#x has no QEMU button; dropped", self.source.name, code)
            return
        link = self._link
        if link is not None and not link.mouse:
            return
        self._press_or_release(("button", button), down,
                               (MOUSE_IFACE, "Press" if down else "Release", "u", [button]),
                               (MOUSE_IFACE, "Release", "u", [button]))

    def wheel(self, dx: int, dy: int) -> None:
        link = self._link
        if link is not None and not link.mouse:
            return
        # A detent is a press and a release of a wheel "button"; both or neither are sent.
        for steps, forward, back in ((dy, QBTN_WHEEL_UP, QBTN_WHEEL_DOWN),
                                     (dx, QBTN_WHEEL_RIGHT, QBTN_WHEEL_LEFT)):
            if steps == 0:
                continue
            if forward == QBTN_WHEEL_RIGHT and link is not None and not link.horizontal_wheel:
                # QEMU does not check a button number against its InputButton: one it does not know
                # would index past its devices' button tables. Only a QEMU that lists its console's
                # Interfaces (added with MultiTouch in 8.1; Debian 12's 7.2 has none) is surely new
                # enough for wheel-left/right.
                continue
            button = forward if steps > 0 else back
            for _ in range(min(abs(steps), MAX_WHEEL_STEPS)):
                if not self._send((MOUSE_IFACE, "Press", "u", [button]), room=2):
                    return
                self._send((MOUSE_IFACE, "Release", "u", [button]))

    def pointer_abs(self, x: int, y: int) -> None:
        link = self._link
        if link is not None and not link.mouse:
            return
        self._send((MOUSE_IFACE, "SetAbsPosition", "uu", list(self._on_console(x, y))))

    def pointer_rel(self, dx: int, dy: int) -> None:
        link = self._link
        if (link is not None and not link.mouse) or (dx == 0 and dy == 0):
            return
        self._send((MOUSE_IFACE, "RelMotion", "ii", [_clamp32(dx), _clamp32(dy)]))

    def touch(self, kind: str, slot: int, x: int, y: int) -> None:
        link = self._link
        kind_number = TOUCH_TYPES.get(kind)
        if kind_number is None:
            log.debug("%s: touch kind %r is none of %s; dropped", self.source.name, kind, TOUCH_KINDS)
            return
        if link is not None and not link.touch:
            return
        if slot < 0 or (link is not None and slot >= link.max_slots):
            log.debug("%s: touch slot %d is outside QEMU's %d; dropped", self.source.name, slot,
                      link.max_slots if link else 0)
            return
        x, y = self._on_console(x, y)
        call = (MULTITOUCH_IFACE, "SendEvent", "utdd", [kind_number, slot, float(x), float(y)])
        end = (MULTITOUCH_IFACE, "SendEvent", "utdd", [_TOUCH_END, slot, float(x), float(y)])
        if kind in ("down", "motion"):
            if kind == "motion" and ("touch", slot) not in self._down:
                self._send(call)  # a contact the guest does not hold: nothing to owe for it
                return
            self._press_or_release(("touch", slot), True, call, end)
        else:
            self._press_or_release(("touch", slot), False, call, end)

    # --- what the daemon and tests read -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def outstanding(self) -> int:
        """Calls of the current connection QEMU has not answered yet."""
        return self._link.outstanding if self._link is not None else 0

    @property
    def stalled(self) -> bool:
        return self._stalled

    def status(self) -> dict[str, Any]:
        link = self._link
        return {"keyboard": bool(link and link.keyboard), "mouse": bool(link and link.mouse),
                "touch": bool(link and link.touch), "absolute": self._absolute,
                "outstanding": self.outstanding, "stalled": self._stalled, "sent": self.sent,
                "answered": self.answered, "refused": self.refused, "dropped": self.dropped}

    # --- sending -------------------------------------------------------------------------------------

    def _on_console(self, x: int, y: int) -> tuple[int, int]:
        """(x, y) moved onto the console: QEMU refuses a pointer position outside it and scales a touch
        outside it past its axes' range, and an unsigned position cannot be negative. A pointer just
        past the edge goes to the edge."""
        width, height = self.source._console_size or (_UINT32_MAX + 1, _UINT32_MAX + 1)
        return min(max(int(x), 0), width - 1), min(max(int(y), 0), height - 1)

    def _press_or_release(self, what: tuple[str, int], down: bool, call: _Call, release: _Call) -> None:
        if down:
            if self._send(call):
                self._down[what] = release
                self._owed.pop(what, None)
            else:
                # Dropped: if the guest still holds it from before, it holds it as the user does again.
                self._owed.pop(what, None)
        elif self._send(call):
            self._down.pop(what, None)
            self._owed.pop(what, None)
        elif what in self._down:
            self._owed[what] = release

    def _send(self, call: _Call, room: int = 1) -> bool:
        """Hand one call to the connection (not waiting for its answer); False when it was dropped."""
        link = self._link
        if link is None or not link.bus.connected:
            self.dropped += 1
            return False
        if self._stalled or link.outstanding + room > self.max_calls:
            self._stall()
            return False
        iface, member, signature, body = call
        msg = Message(destination=link.dest, path=link.path, interface=iface, member=member,
                      signature=signature, body=body)
        link.outstanding += 1
        try:
            # dbus-fast's callback form of a call: no future, no task per input event; the answer (or
            # the connection's end) comes to _answered.
            link.bus._call(msg, partial(self._answered, link, member))
        except Exception as exc:  # a value the message cannot carry: a bug of ours, not QEMU's
            link.bus._method_return_handlers.pop(msg.serial, None)
            link.outstanding -= 1
            self.dropped += 1
            log.warning("%s: could not send %s.%s%r to QEMU: %s", self.source.name, iface, member,
                        tuple(body), exc)
            return False
        self.sent += 1
        return True

    def _stall(self) -> None:
        self.dropped += 1
        self._stall_drops += 1
        if not self._stalled:
            self._stalled = True
            log.warning("%s: %d input calls wait for QEMU's answer (a stuck VM, or input faster than it "
                        "takes it); dropping the guest's input until QEMU catches up", self.source.name,
                        self.outstanding)

    def _answered(self, link: _InputLink, member: str, reply: Message | None, err: Exception | None) -> None:
        link.outstanding -= 1
        if link is not self._link or reply is None:
            return  # an older connection, or this one ending (the source's disconnect cleans up)
        self.answered += 1
        if reply.message_type == MessageType.ERROR:
            self.refused += 1
            log.debug("%s: QEMU refused input %s: %s %s", self.source.name, member, reply.error_name,
                      reply.body[0] if reply.body else "")
        if self._stalled and link.outstanding <= self.max_calls // 2:
            self._stalled = False
            log.info("%s: QEMU answers input calls again (%d input events were dropped)", self.source.name,
                     self._stall_drops)
            self._stall_drops = 0
            self._pay_owed()

    def _pay_owed(self) -> None:
        for what, release in list(self._owed.items()):
            if not self._send(release):
                return
            del self._owed[what]
            self._down.pop(what, None)

    # --- the connection ------------------------------------------------------------------------------

    async def _connect(self, bus: MessageBus, dest: str | None, path: str,
                       interfaces: list[str] | None) -> None:
        """Read what the console offers for input (Interfaces, MaxSlots, IsAbsolute) and send input to
        it from now on. A property QEMU will not give is logged and guessed: input is not worth losing
        the display over."""
        offered = list(LEGACY_INPUT_IFACES) if interfaces is None else list(interfaces)
        keyboard, mouse, touch = (i in offered for i in (KEYBOARD_IFACE, MOUSE_IFACE, MULTITOUCH_IFACE))
        max_slots = 0
        if touch:
            props = await self._properties(path, MULTITOUCH_IFACE)
            max_slots = max(0, int(variant_value(props.get("MaxSlots", 0)) or 0))
        if keyboard:
            props = await self._properties(path, KEYBOARD_IFACE)
            self.modifiers = int(variant_value(props.get("Modifiers", 0)) or 0)
        if mouse:
            changes = self._absolute_changes
            props = await self._properties(path, MOUSE_IFACE)
            if self._absolute_changes == changes and "IsAbsolute" in props:
                self._absolute = bool(variant_value(props["IsAbsolute"]))
        # No await from the last answer to here: a PropertiesChanged handled before this line has
        # already been applied, one after it finds the new link.
        self._link = _InputLink(bus, dest, path, keyboard, mouse, touch, max_slots,
                                horizontal_wheel=interfaces is not None)
        self._down.clear()
        self._owed.clear()
        self._stalled = False
        self._stall_drops = 0
        missing = [n.rsplit(".", 1)[-1] for n, has in ((KEYBOARD_IFACE, keyboard), (MOUSE_IFACE, mouse))
                   if not has]
        told = ", ".join(missing)
        if told != (self._told_interfaces or ""):
            if missing:
                log.info("%s: the console has no %s interface: %s", self.source.name, " or ".join(missing),
                         "input to this guest is dropped" if len(missing) == 2 else "that input is dropped")
            else:
                log.info("%s: the console takes keyboard and mouse input again", self.source.name)
        self._told_interfaces = told
        log.debug("%s: input: keyboard %s, mouse %s (%s), touch %s (%d slots)", self.source.name, keyboard,
                  mouse, "absolute" if self._absolute else "relative", touch, max_slots)

    async def _properties(self, path: str, iface: str) -> dict[str, Any]:
        try:
            return await self.source._get_all(path, iface)
        except (DBusError, TimeoutError) as exc:  # QEMU said no; a closed connection fails the connect
            log.warning("%s: reading QEMU's %s properties: %s", self.source.name, iface, describe_error(exc))
            return {}

    def _disconnect(self) -> None:
        self._link = None
        self._down.clear()
        self._owed.clear()
        self._stalled = False
        self._stall_drops = 0

    def _on_properties(self, iface: str, changed: dict[str, Any]) -> None:
        """A PropertiesChanged of the console's input interfaces."""
        if iface == MOUSE_IFACE and "IsAbsolute" in changed:
            self._absolute_changes += 1
            absolute = bool(variant_value(changed["IsAbsolute"]))
            if absolute != self._absolute:
                log.info("%s: the guest's pointer is now %s", self.source.name,
                         "absolute" if absolute else "relative")
            self._absolute = absolute
        elif iface == KEYBOARD_IFACE and "Modifiers" in changed:
            self.modifiers = int(variant_value(changed["Modifiers"]) or 0)
        elif iface == MULTITOUCH_IFACE and "MaxSlots" in changed and self._link is not None:
            self._link.max_slots = max(0, int(variant_value(changed["MaxSlots"]) or 0))


def _clamp32(value: int) -> int:
    return min(max(int(value), _INT32[0]), _INT32[1])
