"""Signs of progress, from any room and any thread, for the hang watchdog (pretrain/train/watchdog.py).

A long phase that is not a step (an evaluation's forwards, a checkpoint's files being written while the loop
waits for them) says `progress()` now and then, so that it is not taken for a hang."""
from __future__ import annotations

from typing import Callable

_LISTENERS: list[Callable[[], None]] = []


def progress() -> None:
    for listener in list(_LISTENERS):
        listener()


def listen(listener: Callable[[], None]) -> None:
    _LISTENERS.append(listener)


def forget(listener: Callable[[], None]) -> None:
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)
