"""Reading the policy file as a root process should: without blocking, within a size, and, for a
policy that makes the compositor run commands (`launch:`), only from a path no other user can change.

The file is opened with O_NONBLOCK (a FIFO named as the policy does not block the open, nor the loop),
checked with fstat before anything is read (only a regular file is a policy: a FIFO, a device such as
/dev/zero behind a symlink, a directory are refused by name), and read up to MAX_BYTES.

`launch:` runs its command as the compositor's user, root. Like sshd's StrictModes and sudoers, such a
policy is taken only if nobody else could have written it or swapped it: the file, every symlink on
the way to it, and every directory above each of them up to `/` must be owned by root or the
compositor's user, and not writable by group or others. A directory writable by others is accepted
only with the sticky bit (as /tmp) and then only if the entry below it is owned by root or the
compositor's user: nobody else can rename or remove that entry.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_BYTES = 1 << 20  # a policy of a thousand monitors and guests is under 100 KiB


class PolicyFileError(OSError):
    """The policy file cannot be taken as it is (the message says why)."""


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket"}


def read(path: str | Path) -> str:
    """The text of the policy file at `path`. FileNotFoundError if it is gone, PolicyFileError if it
    is not a regular file, is larger than MAX_BYTES or not UTF-8, OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise PolicyFileError(f"{path} is {kind}: a policy is read only from a regular file")
        if st.st_size > MAX_BYTES:
            raise PolicyFileError(f"{path} holds {st.st_size} bytes: a policy may hold at most {MAX_BYTES}")
        chunks, size = [], 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_BYTES:   # it grew while read
            raise PolicyFileError(f"{path} holds more than {MAX_BYTES} bytes: a policy may hold at most "
                                  f"{MAX_BYTES}")
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyFileError(f"{path} is not UTF-8 text (byte {exc.start})") from None


def unsafe(path: str | Path, trusted: frozenset[int] | None = None) -> str | None:
    """Why another user could have written or swapped the policy at `path` (None: nobody could).
    `trusted`: the owners allowed (default: root and this process's user)."""
    trusted = trusted if trusted is not None else frozenset({0, os.getuid()})
    return _Walk(trusted).file(os.path.abspath(path))


class _Walk:
    """Every directory from `/` down to a path, each symlink met followed (and its target walked the
    same way), each entry checked against the directory holding it."""

    def __init__(self, trusted: frozenset[int]) -> None:
        self.trusted = trusted
        self.links = 0

    def file(self, path: str) -> str | None:
        parent, why = self.directory(os.path.dirname(path))
        if why:
            return why
        entry = os.path.join(parent, os.path.basename(path))
        st = os.lstat(entry)
        if stat.S_ISLNK(st.st_mode):
            target, why = self._target(parent, entry)
            return self._entry(parent, entry, st) or why or self.file(target)
        return self._entry(parent, entry, st) or _writable(entry, st, "the policy file", self.trusted)

    def directory(self, path: str) -> tuple[str, str | None]:
        """(the directory's real path, why it is unsafe or None)."""
        current = "/"
        why = _writable_dir("/", os.stat("/"), self.trusted)
        for name in [p for p in path.split("/") if p and p != "."]:
            if why:
                break
            if name == "..":
                current = os.path.dirname(current)
                continue
            entry = os.path.join(current, name)
            st = os.lstat(entry)
            why = self._entry(current, entry, st)
            if why:
                break
            if stat.S_ISLNK(st.st_mode):
                target, why = self._target(current, entry)
                if why:
                    break
                current, why = self.directory(target)
            else:
                why = _writable_dir(entry, st, self.trusted)
                current = entry
        return current, why

    def _target(self, parent: str, link: str) -> tuple[str, str | None]:
        """Where the symlink `link` in `parent` leads, counted against the kernel's bound of 40."""
        self.links += 1
        if self.links > 40:
            return "", f"{link}: more than 40 symlinks"
        return os.path.normpath(os.path.join(parent, os.readlink(link))), None

    def _entry(self, parent: str, entry: str, st: os.stat_result) -> str | None:
        """An entry of a directory that others may write: safe only in a sticky one, owned by a trusted
        user (nobody else can then rename or remove it)."""
        pst = os.stat(parent)
        if not pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        who = "others" if pst.st_mode & stat.S_IWOTH else "its group"
        if not pst.st_mode & stat.S_ISVTX:
            return f"{parent} (on the way to the policy) is writable by {who} (mode {pst.st_mode & 0o7777:o})"
        if st.st_uid not in self.trusted:
            return f"{entry} is owned by uid {st.st_uid}, in {parent}, which {who} may write"
        return None


def _writable_dir(path: str, st: os.stat_result, trusted: frozenset[int]) -> str | None:
    if st.st_uid not in trusted:
        return f"{path} (on the way to the policy) is owned by uid {st.st_uid}"
    return None   # writable by others: checked for each entry in it (the sticky rule)


def _writable(path: str, st: os.stat_result, what: str, trusted: frozenset[int]) -> str | None:
    if st.st_uid not in trusted:
        return f"{what} {path} is owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        return f"{what} {path} is writable by {who} (mode {st.st_mode & 0o7777:o})"
    return None
