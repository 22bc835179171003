"""One inference session on a node: what it holds, and the checks of one step against it.

See spec/messages.md §5.3 (the node's checks of a step, in order), §5.6 (positions and
masks, and the rollback a ``truncate`` step asks for), §5.7 (duplicates), §5.9 (the idle clock, which
``KeepAlive`` restarts within a bound) and §5.10 (the session's upstream). Pure data and rules, no
I/O and no clock (time is an argument). The node's session state machine (node/session_machine.py) owns every
``Session`` and every transition between its phases; this module answers the
questions it asks about one session: is this step a duplicate, is it valid here (and
then: which ``models.step.SpanStep`` do the blocks run), what does the session hold
after it ran.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from biopetals.models.step import SpanStep, span_step
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.messages import CloseSession, Push, Step
from biopetals.protocol.tensors import Codec

__all__ = ["Checked", "Session"]


@dataclass(frozen=True, eq=False)
class Checked:
    """A ``Step``/``Push`` that passed every check of its session: ready to run."""

    message: Step | Push
    step: SpanStep  # what this node's blocks compute
    rest: torch.Tensor | None  # the prompts of the hops after this node (§5.7), None if none


@dataclass(eq=False)
class Session:
    """One session (spec/messages.md §5): its span, cache, positions, masks and step ids."""

    session_id: bytes
    start: int
    end: int
    batch_size: int
    max_length: int
    codec: Codec
    adapter: str | None  # the server-side adapter of every step (§6.3)
    owner: Hashable = field(repr=False)  # the session stream, as the driver names it
    peer: Any = field(repr=False)  # the authenticated peer that opened the session
    upstream: Any = field(default=None, repr=False)  # the one peer whose Push counts (§5.10); None: nobody
    last_activity: float = 0.0  # the last Step, Push or KeepAlive (§5.9): the idle clock
    last_work: float = 0.0  # the last Step or Push: bounds what keepalives alone may hold (§5.9.1)
    is_open: bool = False  # False while its cache is being allocated
    cache: Any = field(default=None, repr=False)  # models.blocks.SpanCache once allocated
    length: int = 0  # positions (columns) held in the cache, padding included (§5.6)
    mask: torch.Tensor | None = field(default=None, repr=False)  # bool [batch, length]; None: no padding yet
    last_step_id: int | None = None
    running: Checked | None = field(default=None, repr=False)  # the step in flight (at most one)
    inbox: deque[Step | Push | CloseSession] = field(default_factory=deque, repr=False)  # waiting, in order

    @property
    def busy(self) -> bool:
        """A step runs or waits: the session is not idle (§5.9)."""
        return self.running is not None or bool(self.inbox)

    def touch(self, now: float) -> None:
        """A ``Step`` or ``Push`` arrived, or a step ran: the session is in use (§5.9)."""
        self.last_activity = self.last_work = now

    def keep_alive(self, now: float) -> None:
        """A ``KeepAlive`` arrived: the idle clock restarts, the last work stays (§5.9.1)."""
        self.last_activity = max(self.last_activity, now)

    def idle_deadline(self, idle_timeout: float, max_keepalive_hold: float = 0.0) -> float:
        """When the session closes as idle (§5.9, §5.9.1): ``idle_timeout`` after its last ``Step``, ``Push`` or
        ``KeepAlive``, and keepalives alone hold it at most ``max_keepalive_hold`` after its last
        ``Step`` or ``Push`` (never less than ``idle_timeout`` after it)."""
        return min(self.last_activity + idle_timeout, self.last_work + max(idle_timeout, max_keepalive_hold))

    def is_duplicate(self, step_id: int) -> bool:
        """A step this session already processed, or an older one (§5.7)."""
        return self.last_step_id is not None and step_id <= self.last_step_id

    def check_step(self, step: Step | Push, model_hidden: int) -> Checked:
        """The node's checks of a ``Step``/``Push`` after duplicates, in the order of §5.3."""
        batch, tokens, hidden_size = step.hidden.shape
        if batch != self.batch_size:
            raise RemoteProtocolError(
                ErrorCode.INVALID_TENSOR, f"hidden batch {batch} != the session's batch_size {self.batch_size}"
            )
        if hidden_size != model_hidden:
            raise RemoteProtocolError(
                ErrorCode.HIDDEN_SIZE_MISMATCH, f"hidden size {hidden_size}; this model's is {model_hidden}"
            )
        if step.position > self.length or (step.position < self.length and not step.truncate):
            allowed = f"at most {self.length} with truncate" if step.position < self.length else f"{self.length}"
            raise RemoteProtocolError(
                ErrorCode.BAD_POSITION,
                f"position {step.position}; the session holds {self.length} positions, so must be {allowed} "
                "(spec/messages.md §5.6)",
            )
        if step.position + tokens > self.max_length:
            raise RemoteProtocolError(
                ErrorCode.BAD_POSITION, f"position {step.position} + {tokens} tokens > max_length {self.max_length}"
            )
        own, rest = self._split_prompts(step)
        # a rollback (§5.6, truncate) keeps the masks of the columns it keeps only
        past = None if self.mask is None else self.mask[:, : step.position]
        return Checked(step, span_step(step.hidden, step.position, past, step.mask, own), rest)

    def _split_prompts(self, step: Step | Push) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The prompts of this span and those of the hops (§5.3 ``prompts``, §5.7); ``next[0]`` starts here."""
        n = self.end - self.start
        covered = (step.next[-1].end - step.next[0].start) if step.next else 0
        if step.prompts is not None and step.prompts.shape[0] != n + covered:
            raise RemoteProtocolError(
                ErrorCode.INVALID_TENSOR,
                f"prompts cover {step.prompts.shape[0]} blocks; the session and its hops cover {n + covered}",
            )
        if step.next and step.next[0].start != self.end:
            raise RemoteProtocolError(
                ErrorCode.INVALID_FIELD, f"next[0] starts at block {step.next[0].start}; this session ends at {self.end}"
            )
        if step.prompts is None:
            return None, None
        return step.prompts[:n], (step.prompts[n:] if covered else None)

    def commit(self, checked: Checked, now: float) -> None:
        """The step ran: the cache holds its columns and their mask (§5.6), a rollback's cut columns
        no more; its id is processed (§5.7)."""
        self.length = checked.step.position + checked.step.tokens
        self.mask = checked.step.mask
        self.last_step_id = checked.message.step_id
        self.touch(now)
