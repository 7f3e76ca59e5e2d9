"""Policy hot reload on real inotify: each way of saving is seen, bad edits keep the last good policy."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from compositor.policy import Policy, PolicyError
from compositor.watch import PolicyWatcher

DEBOUNCE = 0.01


def doc(connector: str) -> str:
    return ("version: 1\nmonitors: {left: " + connector + "}\nguests: {office: }\n"
            "placements: [{guest: office, monitor: left}]\n")


# Unknown key on line 2: the error names the file, line and column.
BROKEN = ("version: 1\nmonitors: {left: {connectr: DP-1}}\nguests: {office: }\n"
          "placements: [{guest: office, monitor: left}]\n")


def connector(p: Policy) -> str:
    return str(p.monitors[0].connector)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 2))


class Recorder:
    """on_change that lets a test wait for the next call."""

    def __init__(self) -> None:
        self.calls: list[Policy] = []
        self.event = asyncio.Event()

    def __call__(self, p: Policy) -> None:
        self.calls.append(p)
        self.event.set()

    async def next(self, timeout: float = 1.0) -> Policy:
        await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()
        return self.calls[-1]


async def quiet(seconds: float = 0.08) -> None:
    """Long enough for any reload the last write could cause (several debounce windows)."""
    await asyncio.sleep(seconds)


def watcher(path: Path, rec: Recorder) -> PolicyWatcher:
    w = PolicyWatcher(path, rec, debounce=DEBOUNCE)
    w.start()
    return w


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(doc("DP-1"))
    return path


def test_first_load(policy_file: Path) -> None:
    w = PolicyWatcher(policy_file, lambda p: None)
    assert connector(w.policy) == "DP-1"
    assert (w.generation, w.last_error) == (0, None)


def test_first_load_of_invalid_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BROKEN)
    with pytest.raises(PolicyError):
        PolicyWatcher(path, lambda p: None)
    with pytest.raises(OSError):
        PolicyWatcher(tmp_path / "missing.yaml", lambda p: None)


def test_in_place_rewrite(policy_file: Path) -> None:
    async def body() -> None:
        rec = Recorder()
        w = watcher(policy_file, rec)
        policy_file.write_text(doc("DP-2"))  # truncate + write + close: IN_CLOSE_WRITE
        assert connector(await rec.next()) == "DP-2"
        await quiet()
        assert len(rec.calls) == 1
        assert (connector(w.policy), w.generation, w.last_error) == ("DP-2", 1, None)
        w.stop()

    run(body)


@pytest.mark.parametrize("temp_name", ["policy.yaml.tmp", ".policy.yaml.swp", "sedAbC123"])
def test_rename_over(policy_file: Path, temp_name: str) -> None:
    """Atomic writes and `sed -i`: a temp file in the same directory renamed over the policy."""
    async def body() -> None:
        rec = Recorder()
        w = watcher(policy_file, rec)
        temp = policy_file.parent / temp_name
        temp.write_text(doc("HDMI-A-1"))  # events for the temp name alone are ignored
        os.replace(temp, policy_file)     # IN_MOVED_TO policy.yaml
        assert connector(await rec.next()) == "HDMI-A-1"
        await quiet()
        assert len(rec.calls) == 1
        w.stop()

    run(body)


def test_vim_style_save(policy_file: Path) -> None:
    """vim with backupcopy=no: rename the original away, write a new file under the name."""
    async def body() -> None:
        rec = Recorder()
        w = watcher(policy_file, rec)
        os.rename(policy_file, policy_file.with_name("policy.yaml~"))  # IN_MOVED_FROM
        policy_file.write_text(doc("DP-3"))                             # IN_CREATE, IN_CLOSE_WRITE
        assert connector(await rec.next()) == "DP-3"
        w.stop()

    run(body)


def test_invalid_edit_keeps_the_last_good_policy(policy_file: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rec = Recorder()
        w = watcher(policy_file, rec)
        good = w.policy
        with caplog.at_level(logging.ERROR, "directflip.policy"):
            policy_file.write_text(BROKEN)
            await quiet()
        assert rec.calls == []
        assert w.policy is good and w.generation == 0
        assert w.last_error is not None and f"{policy_file}:2:" in w.last_error
        (record,) = [r for r in caplog.records if r.name == "directflip.policy"]
        assert record.levelno == logging.ERROR
        assert "edit rejected, keeping the last good policy:" in record.getMessage()
        assert f"{policy_file}:2:" in record.getMessage()

        policy_file.write_text(doc("DP-2"))  # the next valid edit is applied
        assert connector(await rec.next()) == "DP-2"
        assert (w.generation, w.last_error) == (1, None)
        w.stop()

    run(body)


def test_unreadable_file_is_rejected(policy_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = PolicyWatcher(policy_file, lambda p: None)
    policy_file.unlink()
    policy_file.mkdir()  # reading a directory: IsADirectoryError, an OSError other than "gone"
    with caplog.at_level(logging.ERROR, "directflip.policy"):
        assert w.reload() is False
    assert w.last_error is not None and str(policy_file) in w.last_error
    assert "edit rejected" in caplog.text and connector(w.policy) == "DP-1"


def test_identical_content_makes_no_callback(policy_file: Path) -> None:
    async def body() -> None:
        rec = Recorder()
        w = watcher(policy_file, rec)
        policy_file.write_text(doc("DP-1"))
        await quiet()
        assert rec.calls == [] and w.generation == 0
        w.stop()

    run(body)


def test_delete_then_recreate(policy_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rec = Recorder()
        w = watcher(policy_file, rec)
        good = w.policy
        with caplog.at_level(logging.WARNING, "directflip.policy"):
            policy_file.unlink()
            await quiet()
        assert "policy file removed; keeping the last good policy" in caplog.text
        assert rec.calls == [] and w.policy is good and w.last_error is not None

        policy_file.write_text(doc("DP-2"))
        assert connector(await rec.next()) == "DP-2"
        assert (w.generation, w.last_error) == (1, None)
        w.stop()

    run(body)


def test_quick_writes_coalesce(policy_file: Path) -> None:
    async def body() -> None:
        rec = Recorder()
        w = PolicyWatcher(policy_file, rec, debounce=0.05)
        w.start()
        for name in ("DP-2", "DP-3", "DP-4", "DP-5"):
            policy_file.write_text(doc(name))
        assert connector(await rec.next()) == "DP-5"
        await quiet(0.12)
        assert len(rec.calls) == 1 and w.generation == 1
        w.stop()

    run(body)


def test_on_change_raising_does_not_stop_the_watcher(policy_file: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rec = Recorder()
        fail = True

        def on_change(p: Policy) -> None:
            rec(p)
            if fail:
                raise RuntimeError("planner exploded")

        w = PolicyWatcher(policy_file, on_change, debounce=DEBOUNCE)
        w.start()
        with caplog.at_level(logging.ERROR, "directflip.policy"):
            policy_file.write_text(doc("DP-2"))
            assert connector(await rec.next()) == "DP-2"
        (record,) = [r for r in caplog.records if r.name == "directflip.policy"]
        assert record.exc_info is not None and "planner exploded" in caplog.text
        assert w.generation == 1  # applied all the same

        fail = False
        policy_file.write_text(doc("DP-3"))
        assert connector(await rec.next()) == "DP-3"
        assert w.generation == 2
        w.stop()

    run(body)


def test_reload_by_hand(policy_file: Path) -> None:
    """What SIGHUP does: no loop, no watch needed."""
    rec: list[Policy] = []
    w = PolicyWatcher(policy_file, rec.append)
    assert w.reload() is False
    policy_file.write_text(doc("DP-2"))
    assert w.reload() is True and connector(rec[-1]) == "DP-2"


def test_stop_removes_the_reader(policy_file: Path) -> None:
    async def body() -> None:
        rec = Recorder()
        w = watcher(policy_file, rec)
        fd = w._notifier._fd  # type: ignore[union-attr]
        policy_file.write_text(doc("DP-2"))  # pending in the debounce window when stopped
        await asyncio.sleep(0)
        w.stop()
        policy_file.write_text(doc("DP-3"))
        await quiet()
        assert rec.calls == [] and connector(w.policy) == "DP-1"
        loop = asyncio.get_running_loop()
        assert not loop.remove_reader(fd)  # already gone
        w.stop()  # idempotent

    run(body)
