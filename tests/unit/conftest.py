"""Fixtures shared by the unit tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from native_override import load

# `make sanitize`: the C helper built with ASan and UBSan, loaded before any test imports the real one,
# so before the imports below (the fakes and the KMS layer import compositor._native).
SANITIZED = load()

from fakes import libdrm  # noqa: E402
from fakes.card import flips_on_fake_cards  # noqa: E402

from compositor.kms import Card  # noqa: E402


@pytest.fixture
def private_bus(tmp_path):
    """A dbus-daemon of its own, on a socket in the test's directory: its address."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        pytest.fail("no dbus-daemon on this host (Debian: dbus-daemon; `make unit` installs it)")
    address = f"unix:path={tmp_path}/bus"
    proc = subprocess.Popen([daemon, "--session", "--nofork", "--nopidfile", f"--address={address}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not (tmp_path / "bus").exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("dbus-daemon did not start")
        time.sleep(0.02)
    yield address
    proc.terminate()
    proc.wait(5)


@pytest.fixture(scope="module")
def fake_native_flip():
    """OutputLayer's commits land on the fake card (tests/fakes/card.py) for the whole module: a
    module that drives outputs on FakeCard says `pytestmark = pytest.mark.usefixtures(...)`."""
    with flips_on_fake_cards():
        yield


@pytest.fixture
def drm(monkeypatch: pytest.MonkeyPatch) -> Iterator[libdrm.FakeDevice]:
    """The mock libdrm (tests/fakes/libdrm.py) in place of the real one, for the KMS layer's tests."""
    with libdrm.installed(monkeypatch) as device:
        yield device


@pytest.fixture
def card(drm: libdrm.FakeDevice) -> Iterator[Card]:
    """A Card opened on the mock libdrm's device, closed after the test."""
    card = drm.open_card()
    yield card
    card.close()
