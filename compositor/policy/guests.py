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
        uuid = None
        if "uuid" in keys:
            vnode = keys["uuid"][1]
            v = self.reader.string(vnode, "`uuid`")
            if v is not None and not _UUID.match(v):
                self.reader.error(vnode, f"bad uuid `{v}`",
                                  "expected the mdev UUID, e.g. 0b5d4a9e-7f3c-4c8e-9a1d-2f6e8b3c5d7a")
            elif v is not None:
                uuid = v.lower()
        kind = None
        if "kind" in keys:
            vnode = keys["kind"][1]
            v = self.reader.string(vnode, "`kind`")
            if v is not None and v not in GUEST_KINDS:
                self.reader.error(vnode, f"unknown guest kind `{v}`",
                                  did_you_mean(v, GUEST_KINDS)
                                  or "expected one of: " + ", ".join(GUEST_KINDS))
            else:
                kind = v
        uids = None
        if "users" in keys:
            uids = tuple(self.user(v, n) for v, n in self.user_names(keys["users"][1]))
            uids = tuple(u for u in uids if u is not None)
        launch = None
        if "launch" in keys:
            vnode = keys["launch"][1]
            launch = self.reader.string(vnode, "`launch`")
            if launch is not None and (kind != "vfio" or uuid is None):
                self.reader.error(vnode, "`launch` needs `kind: vfio` and the vGPU's `uuid`",
                                  "directflip opens the vGPU and starts the command with its device fd")
        display, console = None, 0
        if "display" in keys:
            vnode = keys["display"][1]
            display = self.reader.string(vnode, "`display`")
            if display is not None and kind != "qemu-dbus":
                self.reader.error(vnode, "`display` needs `kind: qemu-dbus`",
                                  "it says where a QEMU VM started with -display dbus shows its picture")
            elif display is not None and not pattern.literal:
                self.reader.error(vnode, f"guest `{name}` names one VM's display, so its `name` cannot be "
                                  f"a pattern (`{pattern}`)", "give the VM's guest name, or drop `name`")
            elif display is not None:
                from compositor.sources.qemu_dbus import QemuTarget

                try:
                    QemuTarget.parse(display)
                except ValueError as exc:
                    self.reader.error(vnode, str(exc))
        elif kind == "qemu-dbus":
            self.reader.warn(knode, f"guest `{name}` has `kind: qemu-dbus` but no `display`: directflip "
                             "does not know where to connect, so it never runs",
                             "add `display: qmp:/path/to/qmp.sock` (QEMU with -display dbus,p2p=yes) or "
                             "`display: dbus:unix:path=/path/to/bus` (-display dbus,addr=...)")
        domain, uri = self.libvirt.read(name, pattern, kind, keys)
        if "console" in keys:
            vnode = keys["console"][1]
            if kind not in ("qemu-dbus", "libvirt"):
                self.reader.error(vnode, "`console` needs `kind: qemu-dbus` or `kind: libvirt`")
            elif not (isinstance(vnode, yaml.ScalarNode) and _CONSOLE.fullmatch(vnode.value)):
                shown = vnode.value if isinstance(vnode, yaml.ScalarNode) else "..."
                self.reader.error(vnode, f"`console` must be a console number (0, 1, ...), not `{shown}`")
            else:
                console = int(vnode.value)
        resize = True
        if "resize" in keys:
            vnode = keys["resize"][1]
            if kind not in ("qemu-dbus", "libvirt"):
                self.reader.error(vnode, "`resize` needs `kind: qemu-dbus` or `kind: libvirt`",
                                  "it tells a QEMU guest its monitor's size")
            elif (v := self.reader.boolean(vnode, "`resize`")) is not None:
                resize = v
        return GuestRule(name, line, pattern, uuid, kind, uids, launch, display, console, domain, uri, resize)

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
