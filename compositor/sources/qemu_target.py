"""Where a QEMU VM's display is (`QemuTarget`): the `display:` of a `kind: qemu-dbus` guest rule.

Kept apart from the source (compositor.sources.qemu_dbus) and free of its imports (no D-Bus library,
no asyncio): the policy parses a rule's `display:` with it, and reading a policy loads nothing of the
display machinery."""

from __future__ import annotations

import socket
from dataclasses import dataclass

BUS_NAME = "org.qemu"  # the name QEMU owns on a bus (-display dbus,addr=...)


@dataclass
class QemuTarget:
    """Where a VM's display is. Exactly one of:

    - `bus`: a D-Bus address QEMU joined with `-display dbus,addr=ADDRESS` (it owns `bus_name` there);
    - `qmp`: QEMU's QMP socket, the VM started with `-display dbus,p2p=yes`: the source hands QEMU one
      end of a socket pair (getfd + add_client) and talks peer to peer;
    - `sock`: an already connected peer-to-peer socket to QEMU's display (a launcher did the QMP part);
      used once, no reconnection;
    - `libvirt`: (URI, domain name or UUID) of a libvirt domain with `<graphics type='dbus'>`
      (compositor.sources.libvirt_domain): libvirt hands out the display, peer to peer or on the
      domain's bus.
    """

    bus: str | None = None
    qmp: str | None = None
    sock: socket.socket | None = None
    console: int = 0
    bus_name: str = BUS_NAME
    libvirt: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("bus", "qmp", "sock", "libvirt") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a QEMU display target needs exactly one of bus, qmp, sock, libvirt (got "
                             f"{', '.join(given) or 'none'})")
        if self.console < 0:
            raise ValueError(f"console {self.console} is negative")

    @classmethod
    def parse(cls, spec: str, console: int = 0) -> QemuTarget:
        """`qmp:/run/vm/qmp.sock` or `dbus:unix:path=/run/vm/bus` (a D-Bus address)."""
        kind, sep, rest = spec.partition(":")
        if sep and rest and kind == "qmp":
            return cls(qmp=rest, console=console)
        if sep and rest and kind == "dbus":
            return cls(bus=rest, console=console)
        raise ValueError(f"{spec!r} is not a QEMU display: write qmp:PATH (QMP socket of a VM started "
                         f"with -display dbus,p2p=yes) or dbus:ADDRESS (-display dbus,addr=ADDRESS)")

    @property
    def reconnects(self) -> bool:
        return self.sock is None

    def describe(self) -> str:
        where = (f"bus {self.bus}" if self.bus is not None else f"QMP {self.qmp}" if self.qmp is not None
                 else f"libvirt domain {self.libvirt[1]} at {self.libvirt[0]}" if self.libvirt is not None
                 else "a handed-over socket")
        return f"{where}, console {self.console}"
