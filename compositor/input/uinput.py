"""Input for a vGPU guest whose VMM directflip launches: a keyboard and a tablet of its own, made with
uinput, that the VMM passes into the VM.

A vGPU's display comes straight from the device; its input has no such path. So directflip makes two
virtual evdev devices per launched guest, `directflip GUEST keyboard` and `directflip GUEST tablet`,
and routes the seat's input to them exactly as to any other guest. The launch command finds them in
`{keyboard}` and `{tablet}` (and $DIRECTFLIP_INPUT_KEYBOARD, $DIRECTFLIP_INPUT_TABLET): QEMU takes
them with

    -object input-linux,id=kbd,evdev={keyboard}  -object input-linux,id=tab,evdev={tablet}

(QEMU's own emulated keyboard and tablet then carry the events), or, for a virtio-input device in the
guest that mirrors ours, `-device virtio-input-host-pci,evdev={keyboard}` (likewise for the tablet).

The tablet is absolute: ABS_X/ABS_Y over 0 … TABLET_MAX, which the guest's driver stretches over its
screen, so directflip maps the guest's framebuffer pixels onto that range. Touch contacts are not
passed on (a tablet has none); they are logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from evdev import AbsInfo, UInput, UInputError
from evdev import ecodes as e

from compositor.input.keys import is_keyboard_key

log = logging.getLogger("directflip.input")

TABLET_MAX = 32767
_BUTTONS = (e.BTN_LEFT, e.BTN_RIGHT, e.BTN_MIDDLE, e.BTN_SIDE, e.BTN_EXTRA)


class UinputSink:
    """The InputSink of one launched vGPU guest. `size()` gives its framebuffer size (None: unknown)."""

    absolute = True

    def __init__(self, guest: str, size: Callable[[], tuple[int, int] | None]) -> None:
        self.guest = guest
        self.size = size
        keys = [c for c in e.KEY if is_keyboard_key(c) and c <= e.KEY_MAX]
        try:
            self.keyboard = UInput({e.EV_KEY: keys}, name=f"directflip {guest} keyboard")
            self.tablet = UInput({e.EV_KEY: list(_BUTTONS),
                                  e.EV_ABS: [(e.ABS_X, AbsInfo(0, 0, TABLET_MAX, 0, 0, 0)),
                                             (e.ABS_Y, AbsInfo(0, 0, TABLET_MAX, 0, 0, 0))],
                                  e.EV_REL: [e.REL_WHEEL, e.REL_HWHEEL]},
                                 name=f"directflip {guest} tablet")
        except (UInputError, OSError) as exc:
            if getattr(self, "keyboard", None) is not None:
                self.keyboard.close()
            raise OSError(f"cannot make uinput devices for {guest} ({exc}); is the uinput module "
                          "loaded (modprobe uinput) and /dev/uinput writable?") from None
        self.sent = 0
        self._touch_logged = False

    @property
    def names(self) -> tuple[str, str]:
        return self.keyboard.name, self.tablet.name

    @property
    def keyboard_path(self) -> str:
        return self.keyboard.device.path

    @property
    def tablet_path(self) -> str:
        return self.tablet.device.path

    def _emit(self, dev: UInput, events: list[tuple[int, int, int]]) -> None:
        try:
            for etype, code, value in events:
                dev.write(etype, code, value)
            dev.syn()
            self.sent += 1
        except OSError as exc:  # uinput does not block; a write error is a closed device
            log.error("guest %s: uinput write failed: %s", self.guest, exc)

    def key(self, code: int, down: bool) -> None:
        self._emit(self.keyboard, [(e.EV_KEY, code, int(down))])

    def button(self, code: int, down: bool) -> None:
        if code in _BUTTONS:
            self._emit(self.tablet, [(e.EV_KEY, code, int(down))])

    def wheel(self, dx: int, dy: int) -> None:
        events = [(e.EV_REL, e.REL_WHEEL, dy)] if dy else []
        events += [(e.EV_REL, e.REL_HWHEEL, dx)] if dx else []
        if events:
            self._emit(self.tablet, events)

    def pointer_abs(self, x: int, y: int) -> None:
        size = self.size()
        if size is None:
            return
        w, h = size
        ax = x * TABLET_MAX // max(1, w - 1)
        ay = y * TABLET_MAX // max(1, h - 1)
        self._emit(self.tablet, [(e.EV_ABS, e.ABS_X, min(ax, TABLET_MAX)),
                                 (e.EV_ABS, e.ABS_Y, min(ay, TABLET_MAX))])

    def pointer_rel(self, dx: int, dy: int) -> None:  # absolute is always True: never called
        pass

    def touch(self, kind: str, slot: int, x: int, y: int) -> None:
        if not self._touch_logged:
            log.info("guest %s: touch input is not passed to a vGPU guest's tablet", self.guest)
            self._touch_logged = True

    def close(self) -> None:
        for dev in (self.keyboard, self.tablet):
            try:
                dev.close()
            except OSError:
                pass
