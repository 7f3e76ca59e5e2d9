"""The `guests` section: which running guests each rule takes (by name pattern, vGPU UUID and kind),
who may connect as them, and what directflip opens itself for them (a vGPU it starts a VMM for, a QEMU
display, a libvirt domain)."""

from __future__ import annotations

import re

import yaml

from compositor.policy.libvirt import LibvirtKeys
from compositor.policy.model import GUEST_KINDS, Glob, GuestRule
from compositor.policy.reader import NULL, Keys, Reader, did_you_mean

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_CONSOLE = re.compile(r"[0-9]{1,9}")  # ASCII digits: int() also takes `١`, and refuses 4300+ digits
_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no user"

_GUEST_KEYS = ("name", "uuid", "kind", "users", "launch", "display", "console", "domain", "uri", "resize")


class GuestSection:
    """Reads the guests into `rules`, in file order (a running guest binds to the first that matches),
    and keeps each name's key node in `nodes`."""

    def __init__(self, reader: Reader):
        self.reader = reader
        self.libvirt = LibvirtKeys(reader)
        self.rules: list[GuestRule] = []
        self.nodes: dict[str, yaml.Node] = {}

    def read(self, top: Keys) -> None:
        if "guests" not in top:
            return
        for name, knode, vnode in self.reader.named_entries(top["guests"][1], "guests"):
            self.nodes[name] = knode
            if (grule := self.guest(name, knode, vnode)) is not None:
                self.shadowed(grule, knode)
                self.rules.append(grule)

    def shadowed(self, rule: GuestRule, knode: yaml.Node) -> None:
        """A rule with a literal name that an earlier rule takes whole (same name, uuid and kind) could
        never be used."""
        for earlier in self.rules:
            if rule.pattern.literal and (earlier.pattern, earlier.uuid, earlier.kind) == (
                    rule.pattern, rule.uuid, rule.kind):
                self.reader.error(knode, f"guest `{rule.name}` matches what guest `{earlier.name}` matches",
                                  "a running guest binds to the first rule that matches it, "
                                  f"so `{rule.name}` could never be used")
                break

    def guest(self, name: str, knode: yaml.Node, node: yaml.Node) -> GuestRule | None:
        line = knode.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode) and node.tag == NULL:
            return GuestRule(name, line, Glob(name))  # `office:` alone matches the guest named office
        keys = self.reader.mapping(node, f"guest `{name}`", _GUEST_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        pattern = Glob(name)
        if "name" in keys and (v := self.reader.string(keys["name"][1], "`name`")) is not None:
            pattern = Glob(v)
        uuid = self.uuid(keys["uuid"][1]) if "uuid" in keys else None
        kind = self.kind(keys["kind"][1]) if "kind" in keys else None
        uids = self.users(keys["users"][1]) if "users" in keys else None
        launch = self.launch(keys["launch"][1], kind, uuid) if "launch" in keys else None
        display = self.display(name, knode, pattern, kind, keys)
        domain, uri = self.libvirt.read(name, pattern, kind, keys)
        console = self.console(keys["console"][1], kind) if "console" in keys else 0
        resize = self.resize(keys["resize"][1], kind) if "resize" in keys else True
        return GuestRule(name, line, pattern, uuid, kind, uids, launch, display, console, domain, uri, resize)

    def uuid(self, node: yaml.Node) -> str | None:
        """The vGPU's mdev UUID, lower-case."""
        v = self.reader.string(node, "`uuid`")
        if v is not None and not _UUID.match(v):
            self.reader.error(node, f"bad uuid `{v}`",
                              "expected the mdev UUID, e.g. 0b5d4a9e-7f3c-4c8e-9a1d-2f6e8b3c5d7a")
            return None
        return v.lower() if v is not None else None

    def kind(self, node: yaml.Node) -> str | None:
        v = self.reader.string(node, "`kind`")
        if v is not None and v not in GUEST_KINDS:
            self.reader.error(node, f"unknown guest kind `{v}`",
                              did_you_mean(v, GUEST_KINDS) or "expected one of: " + ", ".join(GUEST_KINDS))
            return None
        return v

    def users(self, node: yaml.Node) -> tuple[int, ...]:
        """The uids that may connect as the guest; users not found are reported and left out."""
        uids = tuple(self.user(v, n) for v, n in self.user_names(node))
        return tuple(u for u in uids if u is not None)

    def launch(self, node: yaml.Node, kind: str | None, uuid: str | None) -> str | None:
        launch = self.reader.string(node, "`launch`")
        if launch is not None and (kind != "vfio" or uuid is None):
            self.reader.error(node, "`launch` needs `kind: vfio` and the vGPU's `uuid`",
                              "directflip opens the vGPU and starts the command with its device fd")
        return launch

    def display(self, name: str, knode: yaml.Node, pattern: Glob, kind: str | None, keys: Keys) -> str | None:
        """Where a `kind: qemu-dbus` guest's VM shows its picture; a guest of that kind without one is
        never shown, which is worth a warning."""
        if "display" not in keys:
            if kind == "qemu-dbus":
                self.reader.warn(knode, f"guest `{name}` has `kind: qemu-dbus` but no `display`: directflip "
                                 "does not know where to connect, so it never runs",
                                 "add `display: qmp:/path/to/qmp.sock` (QEMU with -display dbus,p2p=yes) or "
                                 "`display: dbus:unix:path=/path/to/bus` (-display dbus,addr=...)")
            return None
        vnode = keys["display"][1]
        display = self.reader.string(vnode, "`display`")
        if display is not None and kind != "qemu-dbus":
            self.reader.error(vnode, "`display` needs `kind: qemu-dbus`",
                              "it says where a QEMU VM started with -display dbus shows its picture")
        elif display is not None and not pattern.literal:
            self.reader.error(vnode, f"guest `{name}` names one VM's display, so its `name` cannot be "
                              f"a pattern (`{pattern}`)", "give the VM's guest name, or drop `name`")
        elif display is not None:
            from compositor.sources.qemu_target import QemuTarget

            try:
                QemuTarget.parse(display)
            except ValueError as exc:
                self.reader.error(vnode, str(exc))
        return display

    def console(self, node: yaml.Node, kind: str | None) -> int:
        """Which console of the VM's display to show."""
        if kind not in ("qemu-dbus", "libvirt"):
            self.reader.error(node, "`console` needs `kind: qemu-dbus` or `kind: libvirt`")
        elif not (isinstance(node, yaml.ScalarNode) and _CONSOLE.fullmatch(node.value)):
            shown = node.value if isinstance(node, yaml.ScalarNode) else "..."
            self.reader.error(node, f"`console` must be a console number (0, 1, ...), not `{shown}`")
        else:
            return int(node.value)
        return 0

    def resize(self, node: yaml.Node, kind: str | None) -> bool:
        """Whether to tell the guest its monitor's size."""
        if kind not in ("qemu-dbus", "libvirt"):
            self.reader.error(node, "`resize` needs `kind: qemu-dbus` or `kind: libvirt`",
                              "it tells a QEMU guest its monitor's size")
        elif (v := self.reader.boolean(node, "`resize`")) is not None:
            return v
        return True

    def user_names(self, node: yaml.Node) -> list[tuple[str, yaml.Node]]:
        if isinstance(node, yaml.ScalarNode):
            return [(node.value, node)]
        if isinstance(node, yaml.SequenceNode):
            return [(item.value, item) for item in node.value if isinstance(item, yaml.ScalarNode)] + [
                ("", item) for item in node.value if not isinstance(item, yaml.ScalarNode)]
        self.reader.error(node, "`users` must be a user or a list of users, got "
                          f"{self.reader.describe(node)}")
        return []

    def user(self, value: str, node: yaml.Node) -> int | None:
        """A user name or numeric uid → uid. Names are resolved when the policy loads, so a typo is
        reported then, not when the guest is refused."""
        import pwd

        if value.isascii() and value.isdigit():
            if len(value) > 10 or int(value) > _MAX_UID:
                self.reader.error(node, f"uid {value[:20]} is out of range",
                                  f"uids go from 0 to {_MAX_UID}")
                return None
            return int(value)
        try:
            return pwd.getpwnam(value).pw_uid
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            self.reader.error(node, f"no user `{value}` on this machine",
                              "give a user name or a numeric uid")
            return None
