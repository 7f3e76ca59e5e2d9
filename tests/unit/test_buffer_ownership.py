"""Every guest buffer counts its own holders (Buffer.holds) and knows whose it is (Buffer.owner): the
daemon frees a forgotten buffer when its last holder lets go and tells the guest `released` for any
other, without searching for either. Real daemon, real planner and pipelines on the fake card."""

from __future__ import annotations

import asyncio

import pytest
from test_capture import Lab
from test_daemon_guests import CARD
from test_scanout import guest_buffer

# OutputLayer commits on the fake card (tests/unit/conftest.py)
pytestmark = pytest.mark.usefixtures("fake_native_flip")


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def test_a_buffer_forgotten_on_screen_is_closed_once_off_it_even_when_its_id_comes_back(lab):
    async def scenario() -> None:
        d = lab.daemon
        one, two = guest_buffer(1), guest_buffer(2)
        await lab.show(one, 0)
        await lab.show(two, 1)
        gs = d.guests["office"]
        assert one.owner is gs and two.owner is gs
        assert (one.holds, two.holds) == (0, 2)     # two: the guest's latest frame and the screen
        assert ("released", 1) in lab.conn.said

        (pipe,) = d.pipelines.values()
        cache = d.layers[CARD].fbcache
        two_fb = pipe.on_screen.fb
        d.on_forget(lab.conn, lab.conn.buffers.pop(2))   # forgotten while on screen: kept
        assert two.fd >= 0 and two.forgotten and gs.forgotten == {two}

        again = guest_buffer(2)                      # the id announced anew: another buffer
        await lab.show(again, 2)
        assert two.fd == -1 and two.holds == 0 and gs.forgotten == set()   # off screen: closed
        # The new buffer has a framebuffer of its own (not the forgotten one's, found by its id), and
        # freeing the forgotten one left it in the cache and on the plane.
        assert pipe.on_screen.frame.buffer is again and pipe.on_screen.fb is not two_fb
        assert cache.entries[again.key][0] is pipe.on_screen.fb and two.key not in cache.entries
        assert lab.conn.said.count(("released", 2)) == 0   # a forgotten buffer is not `released`

        d.on_forget(lab.conn, lab.conn.buffers.pop(2))
        three = guest_buffer(3)
        await lab.show(three, 3)
        assert again.fd == -1 and gs.forgotten == set()
        assert three.holds == 2 and [b.holds for b in (one, two, again)] == [0, 0, 0]

    asyncio.run(scenario())


def test_a_guest_that_leaves_keeps_its_buffer_on_screen_until_the_next_plan(lab):
    async def scenario() -> None:
        d = lab.daemon
        one = guest_buffer(1)
        await lab.show(one, 0)
        gs = d.guests["office"]
        lab.conn.closed = True
        d.on_close(lab.conn, "bye")
        if d._replan_task is not None:
            await d._replan_task
        assert "office" not in d.guests and one.fd == -1 and one.holds == 0
        assert gs not in d.departed   # nothing of it is held: its record goes with the plan
        assert ("released", 1) not in lab.conn.said

    asyncio.run(scenario())
