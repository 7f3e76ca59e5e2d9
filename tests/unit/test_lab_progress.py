"""The lab's progress record: the guest's pytest plugin reports each test over the real channel
protocol, and the host's record says what ran, what was running and what was slow."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

from directflip_tools.lab.channel import CHANNEL_ENV, encode_reply, split_request
from directflip_tools.lab.progress import Progress


def test_report_names_the_running_test_and_the_slowest():
    p = Progress()
    assert p.report() == ["no test had started"]
    for test, outcome, seconds in (("a.py::fast", "passed", 1.0), ("a.py::slow", "failed", 30.0),
                                   ("b.py::mid", "skipped", 5.5)):
        p.note({"event": "start", "test": test})
        p.note({"event": "end", "test": test, "outcome": outcome, "seconds": seconds})
    p.note({"event": "start", "test": "c.py::stuck"})
    lines = p.report(slowest=2)
    assert lines[0] == "3 tests finished (1 failed, 1 passed, 1 skipped) in 36 s"
    assert lines[1].startswith("running when stopped: c.py::stuck, for ")
    assert lines[2] == "failed: a.py::slow"
    assert lines[3:] == ["slowest finished tests:", "     30.0 s  a.py::slow (failed)",
                         "      5.5 s  b.py::mid (skipped)"]


def test_bad_progress_requests_are_refused():
    p = Progress()
    for bad in ({"event": "start"}, {"event": "middle", "test": "x"}):
        try:
            p.note(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_plugin_reports_every_test_through_the_channel(tmp_path):
    (tmp_path / "test_demo.py").write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_bad(): assert False
        @pytest.mark.skip(reason="no")
        def test_skipped(): pass
    """))
    to_guest_r, to_guest_w = os.pipe()
    from_guest_r, from_guest_w = os.pipe()
    record = Progress()
    requests = []

    def host() -> None:
        with os.fdopen(from_guest_r, "rb") as lines, os.fdopen(to_guest_w, "wb", buffering=0) as replies:
            for line in lines:
                _, request = split_request(line)
                if request is None:
                    continue
                requests.append(request)
                replies.write(encode_reply(request["id"], result=record.note(request)))

    server = threading.Thread(target=host, daemon=True)
    server.start()
    env = {**os.environ, CHANNEL_ENV: f"{to_guest_r},{from_guest_w}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "directflip_tools.lab.progress", str(tmp_path / "test_demo.py")],
                          env=env, pass_fds=(to_guest_r, from_guest_w), capture_output=True, text=True,
                          timeout=120)
    os.close(to_guest_r)
    os.close(from_guest_w)
    server.join(timeout=30)
    assert "1 failed, 1 passed, 1 skipped" in proc.stdout, proc.stdout + proc.stderr
    assert [r["event"] for r in requests] == ["start", "end"] * 3
    outcomes = {test.split("::")[1]: outcome for test, outcome, _ in record.done}
    assert outcomes == {"test_ok": "passed", "test_bad": "failed", "test_skipped": "skipped"}
    assert record.running is None
