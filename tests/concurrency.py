"""Running one piece of work on several threads at once, for the thread-safety tests."""

from __future__ import annotations

import threading
from collections.abc import Callable


def on_threads(work: Callable[[], None], count: int = 4) -> None:
    """``work`` on ``count`` threads started together; returns once every one has ended."""
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
