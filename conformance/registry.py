"""The check registry: every conformance check with its id, spec section, level and title.

A check is ``async def check(ctx) -> str | None``: it returns (optionally a note) when the
peer conforms, raises ``Failed`` (with what was sent and received) when it does not, and
``NotApplicable`` when the peer cannot be asked (e.g. a DHT-only peer for node checks).
Any other exception, a timeout or a disconnect is turned into a failure by the runner.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Check", "Failed", "NotApplicable", "REGISTRY", "check"]

SECTIONS = ("transport", "node", "dht", "weights")
LEVELS = ("MUST", "SHOULD")


class Failed(Exception):
    """The peer broke the rule: ``sent``/``received`` describe the exchange."""

    def __init__(self, message: str, *, sent: Any = None, received: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.sent = sent
        self.received = received


class NotApplicable(Exception):
    """The rule cannot be checked against this peer (say why)."""


@dataclass(frozen=True)
class Check:
    id: str
    section: str  # transport | node | dht | weights
    spec: str  # e.g. "spec/messages.md §5.6"
    level: str  # MUST | SHOULD
    title: str
    func: Callable[[Any], Awaitable[str | None]]
    timeout: float = 20.0
    #: runs alongside the others (it only waits on a connection of its own), e.g. a 10 s timeout
    concurrent: bool = False


REGISTRY: dict[str, Check] = {}


def register(c: Check) -> Check:
    if c.id in REGISTRY:
        raise ValueError(f"duplicate check id {c.id}")
    if c.section not in SECTIONS or c.level not in LEVELS:
        raise ValueError(f"bad section/level for {c.id}")
    REGISTRY[c.id] = c
    return c


def check(id: str, spec: str, title: str, *, level: str = "MUST", timeout: float = 20.0, concurrent: bool = False):
    """Decorator: register ``func`` under ``id`` (its section is the id's first part)."""

    def wrap(func):
        register(Check(id, id.split(".", 1)[0], spec, level, title, func, timeout, concurrent))
        return func

    return wrap
