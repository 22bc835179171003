"""Errors the client raises to its user, each saying what to do about it.

``MissingBlocksError`` (routing) is re-exported here. Internally a failed peer
is a ``PeerFailure`` (its session or call failed: connection lost, deadline
passed, an ``Error`` reply, an invalid reply); the chain state (client/chain.py)
reacts by avoiding the peer and re-routing. Only when that is no longer possible
does the user see a ``SwarmError``, which names each peer tried once.

A failure the request itself caused is not the node's fault (``PeerFailure.by_request``:
our own encoder refused the message, or a node answered ``LIMIT_EXCEEDED``, which every
node would answer): it is raised at once as a ``RequestError`` and no node is avoided.
"""

from __future__ import annotations

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError

from .routing import MissingBlocksError

__all__ = ["MissingBlocksError", "PeerFailure", "RequestError", "RollbackUnsupportedError", "SwarmError", "describe_code"]

_HINTS = {
    ErrorCode.CACHE_BUDGET: "the node has no KV-cache room for this session: use a smaller max_length or wait",
    ErrorCode.BUSY: "the node is overloaded",
    ErrorCode.TIMEOUT: "the node did not answer in time",
    ErrorCode.MODEL_MISMATCH: "the node serves another model: check the model path/name matches the swarm's",
    ErrorCode.UNKNOWN_ADAPTER: "the node does not hold this adapter (stale announcement)",
    ErrorCode.BLOCKS_NOT_SERVED: "the node no longer serves these blocks (stale announcement)",
    ErrorCode.SWARM_KEY_MISMATCH: "wrong swarm key: pass the swarm's key file as swarm_key=",
    ErrorCode.CONNECTION_CLOSED: "the connection to the node was lost",
}

# Codes a node answers for what the request is, not for what the node is: any node would answer
# the same, so trying another one only bans healthy nodes (spec/messages.md §7.2).
REQUEST_CODES = frozenset({int(ErrorCode.LIMIT_EXCEEDED)})


def describe_code(code: int) -> str:
    try:
        name = ErrorCode(code).name
    except ValueError:
        name = f"code {code}"
    hint = _HINTS.get(code)  # type: ignore[call-overload]
    return f"{name} ({hint})" if hint else name


class PeerFailure(Exception):
    """A peer failed a call or a session step; the caller avoids it and re-routes.

    ``local``: the failure is our own encoder refusing the message (it never left). ``invalid``: the
    node's bytes broke the protocol (undecodable, over a limit, a reset): its failure whatever the
    code, never the request's (spec/messages.md §2.6)."""

    def __init__(self, peer_id: str, reason: str, code: int | None = None, local: bool = False,
                 invalid: bool = False) -> None:
        self.peer_id = peer_id
        self.reason = reason
        self.code = code
        self.local = local
        self.invalid = invalid
        super().__init__(f"peer {peer_id}: {reason}")

    @property
    def by_request(self) -> bool:
        """True when the request caused it, not the node (``REQUEST_CODES``, or refused before sending)."""
        if self.invalid:
            return False
        return self.local or (self.code is not None and int(self.code) in REQUEST_CODES)


# What to do about a request the client refused, or every node would refuse, by code.
_REQUEST_HINTS = {
    ErrorCode.LIMIT_EXCEEDED: "the request is over a limit of the protocol or the model: send a shorter prompt, a "
                              "smaller batch or a smaller max_length (limits: spec/tensors.md §2, spec/messages.md §1.2)",
    ErrorCode.NON_FINITE: "the inputs hold NaN or infinity, or overflow the codec: check them, or use codec='bf16' "
                          "or 'f32' (spec/tensors.md §4.3)",
    ErrorCode.HIDDEN_SIZE_MISMATCH: "the hidden states must be [batch, tokens, the model's hidden size]",
    ErrorCode.INVALID_TENSOR: "the inputs' shapes do not fit the request (spec/messages.md §8)",
    ErrorCode.BAD_POSITION: "decode without speculation (no assistant_model, no prompt_lookup_num_tokens), or "
                            "upgrade those nodes",
}


class RequestError(ValueError):
    """The request itself cannot be served by any node (a limit, a shape, a value); no node is to blame.

    Raised at once: by the client's own checks before anything is sent (``before_sending``), or
    when a node answers a code that any node would answer for this request (``REQUEST_CODES``)."""

    @classmethod
    def before_sending(cls, reason: str, code: ErrorCode = ErrorCode.LIMIT_EXCEEDED) -> "RequestError":
        """The client's own check refused the request: nothing was sent to any node."""
        return cls(PeerFailure("(this client)", f"{code.name}: {reason}", int(code), local=True))

    def __init__(self, failure: PeerFailure) -> None:
        self.failure = failure
        where = "refused before sending" if failure.local else f"node {failure.peer_id} refused it"
        default = _REQUEST_HINTS[ErrorCode.LIMIT_EXCEEDED]
        hint = _REQUEST_HINTS.get(failure.code, default)  # type: ignore[call-overload]
        super().__init__(f"{where}: {failure.reason}; {hint}")


class RollbackUnsupportedError(RequestError):
    """A node of the route does not accept cache rollback (spec/messages.md §5.6.1, revision 4), which
    speculative decoding needs; raised before any rollback is sent. Plain decoding still works."""


class SwarmError(RuntimeError):
    """The swarm could not complete a request even after re-routing; the message says why and what to do.

    The failures are summed up per peer (each peer named once, with how often and its last reason)."""

    def __init__(self, message: str, failures: list[PeerFailure] | None = None) -> None:
        self.failures = list(failures or [])
        if self.failures:
            message += " Failures: " + summarize_failures(self.failures)
        super().__init__(message)


def summarize_failures(failures: list[PeerFailure]) -> str:
    """``peer A: 3 times, last: <reason>; peer B: <reason>`` (first-seen order)."""
    by_peer: dict[str, list[PeerFailure]] = {}
    for f in failures:
        by_peer.setdefault(f.peer_id, []).append(f)
    parts = []
    for peer, fs in by_peer.items():
        count = f"{len(fs)} times, last: " if len(fs) > 1 else ""
        parts.append(f"peer {peer}: {count}{fs[-1].reason}")
    return "; ".join(parts) + "."


def peer_failure_from(peer_id: str, exc: BaseException) -> PeerFailure:
    """Turn a transport/protocol exception into a ``PeerFailure`` with a readable reason."""
    if isinstance(exc, PeerFailure):
        return exc
    if isinstance(exc, ProtocolError):
        local = isinstance(exc, LocalProtocolError)
        return PeerFailure(peer_id, f"{describe_code(exc.code)}: {exc.message}", int(exc.code), local=local,
                           invalid=not local)
    if isinstance(exc, TimeoutError):
        return PeerFailure(peer_id, "deadline passed", int(ErrorCode.TIMEOUT))
    return PeerFailure(peer_id, f"{type(exc).__name__}: {exc}")
