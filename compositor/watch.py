"""Policy hot reload: watch the policy file, apply each valid edit, keep the last good policy otherwise.

Why the directory is watched, not the file. An inotify watch follows an inode, and editors rarely keep
the inode: vim, `sed -i`, Ansible and every "atomic write" put the new text in a temporary file and
rename it over the original, so a watch on the file would see one IN_MOVE_SELF/IN_DELETE_SELF and then
nothing, ever again. A watch on the directory sees every way of saving by name:

    truncate and rewrite in place   IN_CLOSE_WRITE
    write a temp file, rename over  IN_MOVED_TO
    hard link, `cp` to a new file   IN_CREATE (then IN_CLOSE_WRITE)
    delete, rename away             IN_DELETE, IN_MOVED_FROM

Only events naming the policy's file are acted on. They are coalesced for `debounce` seconds from the
first one (a save is a burst: vim renames the old file away, creates the new one and closes it within a
millisecond), then the file is loaded once. The window is fixed, not restarted by later events, so an
edit is applied at most `debounce` after it lands however busy the directory is.

The last-good rule. The daemon starts only on a valid policy (`PolicyWatcher()` raises like
`policy.load`). After that a rejected edit never replaces it: a file that does not parse or validate,
cannot be read, or is gone leaves the running policy in place, logs why, and keeps it in `last_error`
for `directflip status`. The next valid save is applied as usual; saving what is already running changes
nothing and calls no one.

Symlinks. The directory of the path as given is watched, so replacing the link itself is seen, but
editing the file it points to elsewhere is not, nor is a swap of a symlinked parent directory (the
Kubernetes ConfigMap `..data` dance). Such setups reload with SIGHUP, which calls `reload()`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from compositor import policy
from compositor.policy import Policy, PolicyError

with warnings.catch_warnings():
    # pyinotify imports asyncore for its AsyncNotifier, which is not used here.
    warnings.simplefilter("ignore", DeprecationWarning)
    import pyinotify

# pyinotify gives its logger a stderr handler of its own at import; drop it so its few messages
# (queue overflow, mostly) go through the daemon's logging configuration like everything else.
for _handler in list(logging.getLogger("pyinotify").handlers):
    if type(_handler) is logging.StreamHandler:
        logging.getLogger("pyinotify").removeHandler(_handler)

log = logging.getLogger("directflip.policy")

# Events on entries of the directory; only those naming the policy file matter.
_CHANGED = pyinotify.IN_CLOSE_WRITE | pyinotify.IN_MOVED_TO | pyinotify.IN_CREATE
_GONE = pyinotify.IN_DELETE | pyinotify.IN_MOVED_FROM
_MASK = _CHANGED | _GONE


class PolicyWatcher:
    """Keeps the last good policy of one file and reports each valid edit."""

    def __init__(self, path: str | Path, on_change: Callable[[Policy], None], *, debounce: float = 0.01,
                 loader: Callable[[Path], Policy] = policy.load):
        self.path = Path(path)
        self.on_change = on_change
        self.debounce = debounce
        self.loader = loader
        # The first load is not guarded: the daemon refuses to start on a bad or missing policy.
        self.policy: Policy = loader(self.path)
        self.last_error: str | None = None
        self.generation = 0
        self._missing = False  # the file was found gone; warn once per disappearance
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notifier: pyinotify.AsyncioNotifier | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._loading = False   # a load runs on a worker thread
        self._again = False   # ... and another is due once it is in

    @property
    def directory(self) -> Path:
        """The directory watched: the parent of the path as given (symlinks not followed)."""
        return self.path.absolute().parent

    # -- lifetime

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Watch the policy's directory on `loop` (default: the running loop)."""
        if self._notifier is not None:
            raise RuntimeError(f"already watching {self.path}")
        loop = loop or asyncio.get_running_loop()
        manager = pyinotify.WatchManager()
        # pyinotify calls inotify_init() without IN_CLOEXEC; keep the fd out of child processes.
        os.set_inheritable(manager.get_fd(), False)
        try:
            manager.add_watch(str(self.directory), _MASK, quiet=False)
        except pyinotify.WatchManagerError as exc:
            manager.close()
            raise OSError(errno.ENOENT, f"cannot watch {self.directory}: {exc}") from None
        self._loop = loop
        self._notifier = pyinotify.AsyncioNotifier(manager, loop, default_proc_fun=self._on_event)
        log.debug("watching %s for changes to %s", self.directory, self.path.name)

    def stop(self) -> None:
        """Stop watching: the reader leaves the loop and no callback runs after this returns."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._notifier is not None:
            self._notifier.stop()  # removes the reader and closes the inotify fd
            self._notifier = None
        self._loop = None

    # -- events

    def _on_event(self, event: pyinotify.Event) -> None:
        if event.mask & pyinotify.IN_Q_OVERFLOW:
            # Events were lost, possibly ours: look at the file to be sure.
            log.warning("inotify queue overflowed; re-reading policy %s", self.path)
        elif event.mask & pyinotify.IN_IGNORED:
            # The directory was deleted or unmounted: the kernel dropped the watch for good.
            log.warning("policy directory %s is no longer watched; keeping the last good policy, "
                        "restart or send SIGHUP once it is back", self.directory)
            return
        elif event.name != self.path.name or not event.mask & _MASK:
            return
        if self._pending is None and self._loop is not None:
            self._pending = self._loop.call_later(self.debounce, self._settle)

    def _settle(self) -> None:
        self._pending = None
        self.reload_soon()

    # -- loading

    def reload(self) -> bool:
        """Load the file now, on the caller's thread; True if a new policy was applied."""
        return self._take(*self._attempt())

    def reload_soon(self) -> None:
        """Load the file on a worker thread and apply the result on the loop (what edits and SIGHUP
        do): reading and parsing up to a policy's 1 MiB never stalls the loop."""
        if self._loop is None:
            self.reload()
            return
        if self._loading:
            self._again = True   # once this load is in: the file may have changed since it was read
            return
        self._loading = True
        self._loop.run_in_executor(None, self._attempt).add_done_callback(self._loaded)

    def _loaded(self, future: asyncio.Future) -> None:
        self._loading = False
        if self._loop is None:   # stopped meanwhile
            return
        self._take(*future.result())
        if self._again:
            self._again = False
            self.reload_soon()

    def _attempt(self) -> tuple[Policy | None, BaseException | None]:
        try:
            return self.loader(self.path), None
        except Exception as exc:
            return None, exc

    def _take(self, new: Policy | None, exc: BaseException | None) -> bool:
        if isinstance(exc, PolicyError):
            self._reject("\n".join(str(d) for d in exc.errors))
            return False
        if isinstance(exc, FileNotFoundError):
            self.last_error = f"{self.path}: file removed"
            if not self._missing:
                self._missing = True
                log.warning("%s: policy file removed; keeping the last good policy", self.path)
            return False
        if isinstance(exc, OSError):
            self._reject(exc.strerror and f"{self.path}: {exc.strerror}" or str(exc))
            return False
        if exc is not None or new is None:
            # A loader bug must not take the running policy down with it.
            log.error("policy %s: loader failed; keeping the last good policy", self.path, exc_info=exc)
            self.last_error = f"{self.path}: internal error while loading (see the log)"
            return False
        if self._missing:
            self._missing = False
            log.info("policy %s is back", self.path)
        self.last_error = None
        if new == self.policy:
            log.debug("policy %s saved without changes", self.path)
            return False
        self.policy = new
        self.generation += 1
        log.info("policy %s reloaded (generation %d)", self.path, self.generation)
        for warning in new.warnings:
            log.warning("%s", warning)
        try:
            self.on_change(new)
        except Exception:
            # The policy is applied either way; the failure belongs to whoever acts on it.
            log.exception("policy %s: on_change failed for generation %d", self.path, self.generation)
        return True

    def _reject(self, text: str) -> None:
        self._missing = False
        self.last_error = text
        log.error("policy %s: edit rejected, keeping the last good policy:\n%s", self.path, text)
