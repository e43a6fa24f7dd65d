"""proxy/loop.py: the running loop, remembered per thread while it runs (no getpid each time)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from proxy.loop import running_loop


async def _current() -> asyncio.AbstractEventLoop:
    assert running_loop() is running_loop()  # remembered: the same object again
    return running_loop()


def test_each_loop_in_turn_and_each_thread_gets_its_own() -> None:
    first_loop, first = asyncio.new_event_loop(), None
    try:
        first = first_loop.run_until_complete(_current())
    finally:
        first_loop.close()
    assert first is first_loop
    second_loop = asyncio.new_event_loop()
    try:
        assert second_loop.run_until_complete(_current()) is second_loop  # not the one that stopped
    finally:
        second_loop.close()
    seen: list[asyncio.AbstractEventLoop] = []
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=lambda: seen.append(other.run_until_complete(_current())))
    thread.start()
    thread.join()
    other.close()
    assert seen == [other]


def test_outside_a_loop_it_raises_as_asyncio_does() -> None:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(_current())  # remembered, then stopped
    loop.close()
    with pytest.raises(RuntimeError):
        running_loop()
