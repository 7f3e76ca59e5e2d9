"""compositor.policyfile: the policy is read only from a regular file of bounded size, and a policy
that launches commands only from a path no other user could have changed."""

from __future__ import annotations

import os
import threading

import pytest

from compositor import policy, policyfile
from compositor.policyfile import MAX_BYTES, PolicyFileError

GOOD = "version: 1\nmonitors:\n  left: {connector: DP-1}\n"
LAUNCHING = """version: 1
monitors:
  left: {connector: DP-1}
guests:
  vm:
    kind: vfio
    uuid: 4b20d080-1b54-4048-85b3-a6a62d165c01
    launch: "qemu-system-x86_64 -device vfio-pci,fd={fd}"
placements:
  - {guest: vm, monitor: left}
"""
NOBODY = 65534


def test_a_regular_file_is_read(tmp_path):
    (tmp_path / "p.yaml").write_text(GOOD)
    assert policyfile.read(tmp_path / "p.yaml") == GOOD


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    reader = threading.Thread(target=lambda: result.append(pytest.raises(PolicyFileError, policyfile.read,
                                                                         fifo).value), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert str(result[0]) == f"{fifo} is a FIFO: a policy is read only from a regular file"


def test_a_symlink_to_dev_zero_is_refused(tmp_path):
    (tmp_path / "p.yaml").symlink_to("/dev/zero")
    with pytest.raises(PolicyFileError, match="is a character device: a policy is read only from a regular"):
        policyfile.read(tmp_path / "p.yaml")


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(PolicyFileError, match="is a directory"):
        policyfile.read(tmp_path)


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path):
    big = tmp_path / "p.yaml"
    with open(big, "wb") as f:
        f.truncate(MAX_BYTES + 1)   # sparse: nothing of it is read
    with pytest.raises(PolicyFileError, match=f"holds {MAX_BYTES + 1} bytes: a policy may hold at most"):
        policyfile.read(big)


def test_text_that_is_not_utf8_is_refused(tmp_path):
    (tmp_path / "p.yaml").write_bytes(b"version: 1\n\xff\n")
    with pytest.raises(PolicyFileError, match="is not UTF-8 text"):
        policyfile.read(tmp_path / "p.yaml")


# --- strict modes for `launch:`

def safe_dir(tmp_path):
    """A directory only root may write, under pytest's (root's, below the sticky /tmp)."""
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    return d


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="files of other users need root")


@needs_root
def test_a_launching_policy_only_root_could_write_loads(tmp_path):
    path = safe_dir(tmp_path) / "p.yaml"
    path.write_text(LAUNCHING)
    path.chmod(0o644)
    assert policyfile.unsafe(path) is None
    assert policy.load(path).guests[0].launch


@needs_root
@pytest.mark.parametrize("make_unsafe, why", [
    (lambda d, p: p.chmod(0o666), "the policy file {p} is writable by others (mode 666)"),
    (lambda d, p: p.chmod(0o664), "the policy file {p} is writable by its group (mode 664)"),
    (lambda d, p: os.chown(p, NOBODY, NOBODY), "the policy file {p} is owned by uid 65534"),
    (lambda d, p: d.chmod(0o777), "{d} (on the way to the policy) is writable by others (mode 777)"),
    (lambda d, p: os.chown(d, NOBODY, NOBODY), "{d} (on the way to the policy) is owned by uid 65534"),
])
def test_a_launching_policy_others_could_change_is_refused_at_its_line(tmp_path, make_unsafe, why):
    d = safe_dir(tmp_path)
    p = d / "p.yaml"
    p.write_text(LAUNCHING)
    p.chmod(0o644)
    make_unsafe(d, p)
    with pytest.raises(policy.PolicyError) as err:
        policy.load(p)
    (diag,) = err.value.errors
    assert (diag.file, diag.line) == (str(p), 5)
    assert diag.message.startswith("guest vm: `launch` is refused: " + why.format(d=d, p=p)), diag.message
    p.write_text(GOOD)   # without launch the same file is a policy like any other
    assert policy.load(p).guests == ()


@needs_root
def test_a_symlink_to_a_file_someone_else_owns_is_refused(tmp_path):
    theirs = tmp_path / "home"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    target = theirs / "p.yaml"
    target.write_text(LAUNCHING)
    link = safe_dir(tmp_path) / "p.yaml"
    link.symlink_to(target)
    with pytest.raises(policy.PolicyError) as err:
        policy.load(link)
    assert f"`launch` is refused: {theirs} (on the way to the policy) is owned by uid 65534" in str(err.value)


@needs_root
def test_in_a_sticky_world_writable_directory_the_entry_must_be_ours(tmp_path):
    d = safe_dir(tmp_path)
    d.chmod(0o1777)
    p = d / "p.yaml"
    p.write_text(LAUNCHING)
    p.chmod(0o644)
    assert policyfile.unsafe(p) is None
    os.chown(p, NOBODY, NOBODY)
    assert policyfile.unsafe(p) == f"{p} is owned by uid 65534, in {d}, which others may write"
