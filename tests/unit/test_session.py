"""The session's pure parts: --vt and --session parsing. VT switching and logind are lab tests."""

import os

import pytest

from compositor.session import DirectSession, LogindSession, SessionError, make_session, resolve_vt, vt_of_fd


def test_resolve_vt():
    assert resolve_vt("none") is None
    assert resolve_vt("7") == 7
    assert resolve_vt("63") == 63
    for bad, why in (("0", "1..63"), ("64", "1..63"), ("tty7", "VT number"), ("", "VT number")):
        with pytest.raises(SessionError, match=why):
            resolve_vt(bad)


def test_vt_of_fd_only_for_virtual_terminals(tmp_path):
    r, w = os.pipe()
    try:
        assert vt_of_fd(r) is None
    finally:
        os.close(r)
        os.close(w)
    fd = os.open("/dev/null", os.O_RDONLY)  # a character device, but not a tty
    try:
        assert vt_of_fd(fd) is None
    finally:
        os.close(fd)
    assert vt_of_fd(999_999) is None  # not open


def test_make_session(monkeypatch):
    monkeypatch.delenv("XDG_SESSION_ID", raising=False)
    s = make_session("auto", "none")
    assert isinstance(s, DirectSession) and s.status()["vt"] is None
    assert make_session("direct", "5").status()["vt"] == 5
    monkeypatch.setenv("XDG_SESSION_ID", "c7")
    assert isinstance(make_session("auto", "auto"), LogindSession)
    with pytest.raises(SessionError, match="logind's"):
        make_session("logind", "3")
    with pytest.raises(SessionError, match="auto, direct or logind"):
        make_session("seatd", "auto")
