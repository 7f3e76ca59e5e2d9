"""Hostile guests against the real compositor (`directflip run` on bench/fakedrm.c's fake display
kernel): a local user the policy admits, running as `nobody`, tries to stop, starve or confuse it. Each
case checks what the guest beside it sees (still flipping), that `status` answers, and that the
compositor's descriptors come back to where they were. The times seen are printed, not asserted.

The FUSE cases mount a filesystem served by tests/reliability/hostile.py that never answers a FLUSH:
every close(2) of a descriptor of its file waits until the mount is aborted or its server dies, and
that wait is one no signal ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(HERE))

import hostile  # noqa: E402
import labbench as lb  # noqa: E402
from fakedrm import FakeKernel  # noqa: E402

NOBODY = 65534
POLICY = """version: 1
monitors:
  m0: {connector: Virtual-1, mode: 1280x720}
  m1: {connector: Virtual-2, mode: 1280x720, label: 0}   # no name drawn: no buffers of its own
guests:
  g0: {kind: socket}
  intruder: {name: "intruder*", kind: socket, users: [nobody]}
placements:
  - {guest: g0, monitor: m0}
  - {guest: intruder, monitor: m1}
"""
PER_USER, CONNECTIONS, HELLO_TIMEOUT = 8, 12, 2   # the arena's limits
RSS_SLACK = 8 << 20   # what the allocator may keep after a burst: a leak per client would pass it

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="mounting FUSE and dropping to nobody need root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]


class Arena:
    def __init__(self, fake: FakeKernel) -> None:
        self.fake = fake
        self.comp = lb.Compositor(POLICY, "--device", fake.path, "--session", "direct", "--no-input",
                                  "--max-connections-per-user", str(PER_USER), "--max-connections",
                                  str(CONNECTIONS), "--hello-timeout", str(HELLO_TIMEOUT),
                                  name="hostile", env=fake.env(stats=False))
        # nobody reaches the socket: a directory it may traverse, a socket it may connect to (in real
        # use, the frame socket's group)
        self.comp.dir.chmod(0o711)
        os.chmod(self.comp.socket, 0o666)
        self.good = subprocess.Popen([sys.executable, "-m", "compositor.cli", "guest", "--name", "g0",
                                      "--socket", self.comp.socket, "--on", fake.path, "--size", "640x480",
                                      "--rate", "60", "--duration", "3600"], env=fake.env(stats=False),
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.comp.wait_shown({"m0": "g0"}, timeout=120)

    def frames(self) -> int:
        return self.comp.outputs()["m0"].get("frames", 0)

    def fds(self) -> int:
        """The compositor's open descriptors, once three looks 0.1 s apart agree (a status request's
        connection, say, closes on its own time)."""
        looks: list[int] = []
        for _ in range(100):
            looks = [*looks[-2:], len(os.listdir(f"/proc/{self.comp.pid}/fd"))]
            if len(looks) == 3 and looks[0] == looks[1] == looks[2]:
                break
            time.sleep(0.1)
        return looks[-1]

    def fuse_waiters(self, timeout: float = 30) -> list[int]:
        """Threads of the compositor waiting on a FUSE answer (their kernel wait channel says so),
        once there is one (or `timeout` passed)."""
        deadline = time.monotonic() + timeout
        while True:
            waiters = []
            for tid in os.listdir(f"/proc/{self.comp.pid}/task"):
                try:
                    wchan = Path(f"/proc/{self.comp.pid}/task/{tid}/wchan").read_text()
                except OSError:
                    continue
                if wchan == "request_wait_answer":
                    waiters.append(int(tid))
            if waiters or time.monotonic() > deadline:
                return waiters
            time.sleep(0.05)

    def timed_status(self) -> float:
        t0 = time.monotonic()
        self.comp.status()
        return time.monotonic() - t0

    def still_serving(self, since: int) -> tuple[int, float]:
        """Wait (generously) until the good guest's frames pass `since`; (frames, status seconds)."""
        deadline = time.monotonic() + 60
        while True:
            took = self.timed_status()
            now = self.frames()
            if now > since + 10:
                return now, took
            assert time.monotonic() < deadline, f"g0 stuck at {now} frames\n{self.comp.tail(30)}"
            assert self.comp.proc.poll() is None, self.comp.tail(30)
            time.sleep(0.1)

    def fds_back_to(self, before: int, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while (now := self.fds()) != before and time.monotonic() < deadline:
            time.sleep(0.1)
        return now

    def close(self) -> None:
        self.good.kill()
        self.good.wait(timeout=30)
        self.comp.stop()


@pytest.fixture(scope="module")
def arena() -> Iterator[Arena]:
    with FakeKernel(outputs=2, delay_us=1000) as fake:
        a = Arena(fake)
        try:
            yield a
        finally:
            a.close()


class Fuse:
    """A mount of hostile.py's FUSE filesystem owned by `owner`, torn down whatever happened."""

    def __init__(self, owner: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="directflip-fuse-"))
        self.dir.chmod(0o755)
        self.server = subprocess.Popen([sys.executable, str(HERE / "hostile.py"), "fuse", str(self.dir),
                                        str(owner)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
        line = self.server.stdout.readline().strip()
        assert line == "ready", f"the FUSE server did not mount: {line} {self.server.stdout.read()}"
        self.file = str(self.dir / "frame")
        self.clients: list[int] = []   # pids of guests that opened the file: their exit waits on it too

    def aborted(self, timeout: float = 30) -> bool:
        """Whether the server saw its connection end (it prints "gone" and exits)."""
        try:
            self.server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return "gone" in self.server.stdout.read()

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.kill()   # any close still waiting on it returns once its server is gone
            self.server.wait(timeout=30)
        for pid in self.clients:
            reap(pid)
        self.clients.clear()
        subprocess.run(["umount", "-l", str(self.dir)], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_fuse() -> Iterator[Fuse]:
    fuse = Fuse(NOBODY)
    yield fuse
    fuse.close()


@pytest.fixture
def foreign_fuse() -> Iterator[Fuse]:
    fuse = Fuse(0)
    yield fuse
    fuse.close()


class AsUser:
    """A forked child running `fn(*args)` as `uid`: it prints JSON lines, read with lines(); its stdin
    is a pipe, closed by release() (fn may wait for that)."""

    def __init__(self, uid: int, fn, *args) -> None:
        out_r, out_w = os.pipe()
        in_r, in_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: nothing here may return into pytest
            try:
                os.close(out_r)
                os.close(in_w)
                os.dup2(out_w, 1)
                os.dup2(in_r, 0)
                os.close(out_w)
                os.close(in_r)
                sys.stdout = open(1, "w", closefd=False)   # pytest's capture replaced them
                sys.stdin = open(0, closefd=False)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                fn(*args)
            finally:
                os._exit(1)
        os.close(out_w)
        os.close(in_r)
        self._out = os.fdopen(out_r)
        self._in = in_w

    def lines(self, count: int | None = None) -> list[dict]:
        """The next `count` lines (None: all, until the child closes its stdout)."""
        if count is None:
            return [json.loads(line) for line in self._out]
        return [json.loads(self._out.readline()) for _ in range(count)]

    def release(self) -> None:
        if self._in >= 0:
            os.close(self._in)
            self._in = -1
        self._out.close()


def hostile_guest(arena: Arena, when: str, fuse: Fuse) -> list[dict]:
    """Fork hostile.py's guest as nobody, passing the file of `fuse`; its messages once it has read to
    the end of the stream (its exit may then wait on the FUSE server: `fuse` reaps it when it closes)."""
    child = AsUser(NOBODY, hostile.guest, arena.comp.socket, "intruder", when, fuse.file)
    fuse.clients.append(child.pid)
    try:
        return child.lines()
    finally:
        child.release()


def reap(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        except ChildProcessError:   # reaped already (by subprocess, for a Popen)
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.05)


def attack(arena: Arena, when: str, fuse: Fuse) -> list[dict]:
    """The hostile guest's attack, then g0 still flipping and the compositor's descriptors back where
    they were (the times seen printed); what the hostile guest was told."""
    before_fds, before_frames, before_rss = arena.fds(), arena.frames(), _rss(arena.comp.pid)
    t0 = time.monotonic()
    messages = hostile_guest(arena, when, fuse)
    answered = time.monotonic() - t0
    frames, status_s = arena.still_serving(before_frames)
    after = arena.fds_back_to(before_fds)
    rss = _rss(arena.comp.pid)
    print(f"{when}: answered in {answered:.2f} s; g0 {before_frames} -> {frames} frames; status took "
          f"{status_s:.3f} s; compositor fds {before_fds} -> {after}, RSS {before_rss >> 10} -> "
          f"{rss >> 10} KiB")
    assert messages and messages[-1]["type"] == "error", messages
    assert after == before_fds
    assert rss - before_rss < RSS_SLACK
    return messages


def test_a_fuse_descriptor_with_hello_is_never_taken(arena, own_fuse):
    messages = attack(arena, "hello", own_fuse)
    assert "file descriptors came with hello or before it" in messages[-1]["reason"], messages


def test_a_fuse_descriptor_of_the_guests_own_mount_costs_it_that_mount(arena, own_fuse):
    # Admitted, the guest passes its FUSE file as a buffer. The compositor tells it is no dma-buf from
    # /proc alone, refuses it by name, aborts that FUSE connection (its close would wait forever) and
    # closes it: the loop never waits, g0 keeps flipping, and nothing is left open.
    messages = attack(arena, "buffer", own_fuse)
    assert messages[0]["type"] == "welcome", messages
    assert f"a file descriptor sent is {own_fuse.file}, not a dma-buf, memfd or VFIO device" in \
        messages[-1]["reason"], messages
    assert own_fuse.aborted(), arena.comp.tail(20)
    assert "connection is aborted" in arena.comp.log.read_text()


def test_another_users_fuse_file_stalls_only_the_quarantine(arena, foreign_fuse):
    # The FUSE mount is not the guest's: the compositor does not abort it, and its close waits on
    # the quarantine thread for as long as that server does not answer. The loop is not that thread.
    before_fds, before_frames = arena.fds(), arena.frames()
    messages = hostile_guest(arena, "buffer", foreign_fuse)
    waiters = arena.fuse_waiters()
    frames, status_s = arena.still_serving(before_frames)
    frames, status_s = arena.still_serving(frames)   # and again, well after the refusal
    still = arena.fuse_waiters(timeout=0)
    foreign_fuse.close()   # its server gone, the waiting close returns
    after = arena.fds_back_to(before_fds)
    print(f"g0 {before_frames} -> {frames} frames while thread(s) {still} waited on FUSE; status took "
          f"{status_s:.3f} s; compositor fds {before_fds} -> {after} after; left waiting "
          f"{arena.fuse_waiters(timeout=0)}")
    assert messages[-1]["type"] == "error" and "not a dma-buf, memfd or VFIO device" in messages[-1]["reason"]
    assert len(waiters) == 1 and waiters[0] != arena.comp.pid, (waiters, arena.comp.tail(15))
    assert still == waiters   # the whole time g0 flipped and status answered
    assert arena.fuse_waiters(timeout=0) == [] and after == before_fds


def test_sigterm_ends_the_compositor_while_a_close_waits_on_fuse():
    # A close of another user's FUSE file waits on the quarantine thread; SIGTERM still ends the
    # compositor: stopping, it aborts the connection that close waits on.
    with FakeKernel(outputs=2, delay_us=1000) as fake:
        a = Arena(fake)
        fuse = Fuse(0)
        try:
            messages = hostile_guest(a, "buffer", fuse)
            assert messages[-1]["type"] == "error", messages
            a.still_serving(a.frames())
            waiters = a.fuse_waiters()
            t0 = time.monotonic()
            a.comp.proc.send_signal(signal.SIGTERM)
            code = a.comp.proc.wait(timeout=60)
            print(f"thread(s) {waiters} waiting on FUSE; SIGTERM ended the compositor in "
                  f"{time.monotonic() - t0:.3f} s with code {code}")
            assert waiters, a.comp.tail(20)
            assert code == 0, a.comp.tail(20)
            assert fuse.aborted(), a.comp.tail(20)
        finally:
            fuse.close()
            a.close()


def test_sigkill_ends_the_compositor_after_a_fuse_attack():
    # The attack of the test above, then SIGKILL: the process ends (no thread left in a FUSE wait).
    with FakeKernel(outputs=2, delay_us=1000) as fake:
        a = Arena(fake)
        fuse = Fuse(NOBODY)
        try:
            messages = hostile_guest(a, "buffer", fuse)
            assert messages[-1]["type"] == "error", messages
            a.still_serving(a.frames())
            t0 = time.monotonic()
            a.comp.proc.send_signal(signal.SIGKILL)
            a.comp.proc.wait(timeout=30)
            print(f"SIGKILL ended the compositor in {time.monotonic() - t0:.3f} s")
        finally:
            fuse.close()
            a.close()


def raw_client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    return sock


def test_connections_past_the_caps_are_refused_naming_the_limit(arena):
    # nobody fills its share of connections (admitted guests), its next one is refused as it
    # connects; root fills the rest, and the next connection of anyone is refused by the global cap.
    # g0 flips throughout and every descriptor comes back.
    before_fds, before_frames = arena.fds(), arena.frames()
    child = AsUser(NOBODY, hostile.connections, arena.comp.socket,
                   [f"intruder-{i}" for i in range(PER_USER)], 1)
    roots: list[socket.socket] = []
    try:
        told = child.lines(PER_USER + 1)
        roots = [raw_client(arena.comp.socket) for _ in range(CONNECTIONS - PER_USER - 1)]  # g0 is one
        over = raw_client(arena.comp.socket)
        refusal = hostile._first(over, 20)
        over.close()
        frames, status_s = arena.still_serving(before_frames)
        st = arena.comp.status()
    finally:
        child.release()
        reap(child.pid)
        for sock in roots:
            sock.close()
    after = arena.fds_back_to(before_fds)
    print(f"nobody: {[t['type'] for t in told]}; the last: {told[-1]}; then root's: {refusal}; g0 "
          f"{before_frames} -> {frames} frames, status in {status_s:.3f} s; fds {before_fds} -> {after}")
    assert [t["type"] for t in told] == ["welcome"] * PER_USER + ["error"]
    assert told[-1]["reason"] == (f"uid {NOBODY} has {PER_USER} frame-socket connections open, the most one "
                                  "user may have (directflip run --max-connections-per-user)")
    assert refusal == {"type": "error", "reason": f"the compositor serves at most {CONNECTIONS} frame-socket "
                       "connections at once (directflip run --max-connections)"}
    assert any(g["name"] == "g0" for g in st["guests"])
    assert after == before_fds


def test_a_client_that_never_says_hello_is_closed_at_the_deadline(arena):
    before_fds = arena.fds()
    sock = raw_client(arena.comp.socket)
    t0 = time.monotonic()
    told = hostile._first(sock, 60)
    took = time.monotonic() - t0
    sock.close()
    after = arena.fds_back_to(before_fds)
    print(f"closed after {took:.2f} s (deadline {HELLO_TIMEOUT} s): {told}; fds {before_fds} -> {after}")
    assert told == {"type": "error", "reason": f"no hello within {HELLO_TIMEOUT} s (directflip run "
                    "--hello-timeout)"}
    assert took >= HELLO_TIMEOUT * 0.9 and after == before_fds


def test_a_user_no_rule_admits_is_refused_as_it_connects(arena):
    child = AsUser(12345, hostile.connections, arena.comp.socket, [], 1)
    try:
        (told,) = child.lines(1)
    finally:
        child.release()
        reap(child.pid)
    assert told == {"type": "error", "reason": "uid 12345 may be no guest of this policy (no guest rule "
                    "lists it in users:)"}


def test_thousands_of_bad_clients_log_a_handful_of_lines(arena):
    before_fds, before_frames, before_rss = arena.fds(), arena.frames(), _rss(arena.comp.pid)
    start = len(arena.comp.log.read_text().splitlines())
    child = AsUser(NOBODY, hostile.garbage, arena.comp.socket, 1000)
    try:
        (result,) = child.lines()
    finally:
        child.release()
        reap(child.pid)
    frames, status_s = arena.still_serving(before_frames)
    rss = _rss(arena.comp.pid)
    lines = arena.comp.log.read_text().splitlines()[start:]
    about = [line for line in lines if f"uid {NOBODY}" in line and "WARNING" in line]
    after = arena.fds_back_to(before_fds)
    print(f"{result['errors']} bad clients closed with an error; {len(about)} warning lines about uid "
          f"{NOBODY}; g0 {before_frames} -> {frames}; fds {before_fds} -> {after}; RSS {before_rss >> 10} -> "
          f"{rss >> 10} KiB")
    assert result["errors"] == 1000
    assert rss - before_rss < RSS_SLACK
    assert 1 <= len(about) <= 5, about
    assert after == before_fds


LAUNCHING = POLICY.replace("guests:\n", """guests:
  vm:
    kind: vfio
    uuid: 4b20d080-1b54-4048-85b3-a6a62d165c01
    launch: "touch /tmp/directflip-launched-as-root"
""")


def test_policy_files_that_would_block_or_launch_for_others_keep_the_last_good_policy(arena):
    # Each edit lands as editors save (a new file renamed over the policy): a FIFO nobody writes, a
    # symlink to /dev/zero, a 2 MiB file, and a policy with `launch:` that its group may write. Each
    # is refused by name; the loop never waits (g0 flips, status answers) and the running policy stays.
    path = arena.comp.policy
    generation = arena.comp.status()["policy"]["generation"]

    def save(make) -> str:
        tmp = path.with_name("incoming")
        make(tmp)
        os.replace(tmp, path)
        deadline = time.monotonic() + 60
        while not (error := arena.comp.status()["policy"]["last_error"]):
            assert time.monotonic() < deadline, arena.comp.tail(20)
            time.sleep(0.05)
        return error

    def group_writable(tmp: Path) -> None:
        tmp.write_text(LAUNCHING)
        tmp.chmod(0o664)

    def restore() -> None:
        tmp = path.with_name("incoming")
        tmp.write_text(POLICY)
        os.replace(tmp, path)
        deadline = time.monotonic() + 60
        while arena.comp.status()["policy"]["last_error"]:
            assert time.monotonic() < deadline, arena.comp.tail(20)
            time.sleep(0.05)

    seen = {}
    try:
        for name, make, why in [
            ("fifo", os.mkfifo, f"{path} is a FIFO: a policy is read only from a regular file"),
            ("/dev/zero", lambda t: t.symlink_to("/dev/zero"), f"{path} is a character device"),
            ("2 MiB", lambda t: t.write_bytes(b"#" * (2 << 20)), f"{path} holds {2 << 20} bytes"),
            ("launch, group-writable", group_writable,
             f"guest vm: `launch` is refused: the policy file {path} is writable by its group (mode 664)"),
        ]:
            before = arena.frames()
            seen[name] = save(make)
            frames, status_s = arena.still_serving(before)
            print(f"{name}: {seen[name].splitlines()[0][:120]}; g0 {before} -> {frames}, "
                  f"status {status_s:.3f} s")
            assert why in seen[name], seen[name]
            restore()
    finally:
        restore()
    assert arena.comp.status()["policy"]["generation"] == generation
    assert not os.path.exists("/tmp/directflip-launched-as-root")


def test_planes_cannot_make_a_copy_read_gigabytes(arena):
    # A 64x16 picture with a 30 MiB stride over a sparse memfd (a 480 MiB span) is refused by its
    # stride; planes of 1 GiB each (16384x16384, what such a plane needs) pass until the guest's
    # announced spans would pass 2 GiB. The compositor's memory does not grow with any of them.
    from compositor.sources.framesocket import FrameSocketClient, ServerError

    rss_before = _rss(arena.comp.pid)
    fds = []
    try:
        fd = os.memfd_create("wide", os.MFD_CLOEXEC)
        fds.append(fd)
        os.ftruncate(fd, 16 * 30 * 2**20)
        client = FrameSocketClient(arena.comp.socket, "hog")
        with pytest.raises(ServerError, match=r"stride 31457280 is longer than a row of 64 XR24 pixels "
                                              r"\(256 bytes\) needs, even with 4096 bytes of padding"):
            client.announce(1, fd, "XR24", 64, 16, 30 * 2**20)
            client.poll(5)
        client.close()
        client = FrameSocketClient(arena.comp.socket, "hog")
        side, stride = 16384, 16384 * 4
        for buffer_id in (1, 2, 3):
            fd = os.memfd_create(f"huge-{buffer_id}", os.MFD_CLOEXEC)
            fds.append(fd)
            os.ftruncate(fd, stride * side)
            if buffer_id < 3:
                client.announce(buffer_id, fd, "XR24", side, side, stride)
        client.poll(0.5)
        with pytest.raises(ServerError, match=r"buffer 3: the guest's planes would span 3221225472 bytes, "
                                              r"more than the 2147483648 one guest may have announced"):
            client.announce(3, fds[-1], "XR24", side, side, stride)
            client.poll(5)
        client.close()
    finally:
        for fd in fds:
            os.close(fd)
    rss_after = _rss(arena.comp.pid)
    print(f"compositor RSS {rss_before >> 20} MiB -> {rss_after >> 20} MiB")
    assert rss_after - rss_before < 64 << 20


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_qemu_peer_passing_a_fuse_descriptor_stalls_nothing(foreign_fuse):
    # A QEMU display peer (on a socket pair, as a frame-socket guest hands one over) answers the
    # handshake, then passes its FUSE file as ScanoutDMABUF's dma-buf. The source refuses it by what
    # it is, from /proc alone, with QEMU's error reply; its loop keeps ticking; the descriptor is let
    # go off the loop, its FUSE connection aborted (the mount is the sender's: uid 0 on both sides).
    own_fuse = foreign_fuse   # root's mount, and root's peer
    import asyncio

    from compositor import fdguard
    from compositor.sources.qemu_dbus import QemuDisplaySource, QemuTarget

    class Handler:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    async def body() -> tuple[dict, float, int]:
        ours, theirs = socket.socketpair()
        peer = subprocess.Popen([sys.executable, str(HERE / "hostile.py"), "qemu-peer", str(theirs.fileno()),
                                 own_fuse.file], pass_fds=(theirs.fileno(),), cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        own_fuse.clients.append(peer.pid)
        theirs.close()
        source = QemuDisplaySource("vm", QemuTarget(sock=ours), Handler())
        gaps: list[float] = []

        async def tick() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
        ticker = asyncio.create_task(tick())
        source.start()
        try:
            line = await asyncio.get_running_loop().run_in_executor(None, peer.stdout.readline)
            await asyncio.sleep(0.2)
        finally:
            source.close()
            ticker.cancel()
        return json.loads(line or '{"answer": "none"}'), max(gaps), source.stats.errors

    before = len(os.listdir("/proc/self/fd"))
    told, worst_gap, errors = asyncio.run(body())
    assert fdguard.QUARANTINE.wait_idle(30)
    aborted = own_fuse.aborted()
    after = len(os.listdir("/proc/self/fd"))
    print(f"QEMU peer told {told}; the loop's longest gap {worst_gap * 1000:.0f} ms; FUSE aborted {aborted}; "
          f"fds {before} -> {after}")
    assert told["answer"] == "error", told
    assert f"the descriptor is {own_fuse.file}, not a dma-buf or memfd" in told["text"], told
    assert errors == 1 and aborted
    assert after <= before
