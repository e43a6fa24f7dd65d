"""asyncio.get_running_loop() without its cost on Python 3.11, where every call asks the kernel
for the process id (to notice a fork): a system call, about 4 µs on a VM, twice a poll
(bench/README.md, "getpid"). Each thread remembers its loop while that loop runs."""

from __future__ import annotations

import asyncio
import sys
import threading

_this_thread = threading.local()


def _remembered() -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop | None = getattr(_this_thread, "loop", None)
    if loop is None or not loop.is_running():
        loop = _this_thread.loop = asyncio.get_running_loop()  # RuntimeError where none runs
    return loop


# Python 3.12 keeps the running loop on the thread state, with no system call.
running_loop = asyncio.get_running_loop if sys.version_info >= (3, 12) else _remembered
