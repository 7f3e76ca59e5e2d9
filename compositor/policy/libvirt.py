"""The libvirt keys of a guest: `domain` and `uri`, which only a `kind: libvirt` guest may give."""

from __future__ import annotations

from compositor.policy.model import LIBVIRT_URI, Glob
from compositor.policy.reader import Keys, Reader


class LibvirtKeys:
    """Reads `domain` and `uri` for the guest section, which gives it the guest's kind and name."""

    def __init__(self, reader: Reader):
        self.reader = reader

    def read(self, name: str, pattern: Glob, kind: str | None,
             keys: Keys) -> tuple[str | None, str | None]:
        """`domain` and `uri` of a `kind: libvirt` guest (the domain defaults to the guest's name, the
        URI to qemu:///system)."""
        given = {k: self.reader.string(keys[k][1], f"`{k}`") for k in ("domain", "uri") if k in keys}
        if kind != "libvirt":
            for k in given:
                self.reader.error(keys[k][1], f"`{k}` needs `kind: libvirt`",
                                  "it names the libvirt domain whose display directflip shows")
            return None, None
        domain = given.get("domain") or (pattern.pattern if pattern.literal else None)
        if domain is None:
            self.reader.warn(keys["name"][1] if "name" in keys else keys["kind"][1],
                             f"guest `{name}` has `kind: libvirt` and a pattern for a name (`{pattern}`): it "
                             "names no domain, so directflip never shows one",
                             "give `domain: NAME` (or UUID), or drop `name`")
        elif not pattern.literal:
            self.reader.error(keys["name"][1], f"guest `{name}` names one libvirt domain, so its `name` "
                              f"cannot be a pattern (`{pattern}`)", "give the guest's name, or drop `name`")
        uri = given.get("uri") or LIBVIRT_URI
        if "://" not in uri:
            self.reader.error(keys["uri"][1], f"`uri` `{uri}` is not a libvirt URI",
                              "e.g. qemu:///system (the default) or qemu:///session")
        return domain, uri
