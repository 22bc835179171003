"""The protocol error family and the error codes every layer shares.

Two kinds of error, as in h11: ``LocalProtocolError`` means *our* caller misused
the API (a bug on this side); ``RemoteProtocolError`` means the *peer* sent
something invalid. Every decoder in ``biopetals.protocol`` raises only
``RemoteProtocolError`` (or a subclass) on malformed input, never ``KeyError``,
``ValueError`` or a msgpack exception. Each error carries an ``ErrorCode``; the
node sends that code back in an ``Error`` reply (spec/messages.md, "Errors").

Code ranges: 1-15 encoding and limits, 16-47 node/session, 48-63 DHT,
64-79 transport and handshake.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    # --- encoding and limits (spec/messages.md, spec/tensors.md) ---
    MALFORMED = 1  # not a frame / not msgpack / wrong top-level structure
    UNSUPPORTED_VERSION = 2  # protocol major version this side does not speak
    UNKNOWN_MESSAGE = 3  # message type not defined (for this direction)
    INVALID_FIELD = 4  # missing required field, wrong type, value out of range
    LIMIT_EXCEEDED = 5  # frame, tensor elements, batch, sequence or other spec limit
    INVALID_TENSOR = 6  # unknown codec, shape/size mismatch, corrupt compressed data
    NON_FINITE = 7  # NaN or Inf where the spec forbids them

    # --- node and sessions (spec/messages.md) ---
    UNKNOWN_SESSION = 16  # session id not open on this node (never opened, closed, expired)
    CACHE_BUDGET = 17  # KV cache for the requested max_length does not fit
    BLOCKS_NOT_SERVED = 18  # requested block span not served by this node
    BAD_POSITION = 19  # positions out of range or not contiguous with the cache
    HIDDEN_SIZE_MISMATCH = 20  # tensor's last dimension is not the model's hidden size
    DTYPE_MISMATCH = 21  # tensor dtype/codec not accepted for this request
    BUSY = 22  # node overloaded; retry later or elsewhere
    TIMEOUT = 23  # deadline passed before the node could answer
    INTERNAL = 24  # unexpected failure inside the node; the request may be retried elsewhere
    PUSH_FAILED = 25  # server-to-server push to the next node failed
    MODEL_MISMATCH = 26  # request names a model this node does not serve
    UNKNOWN_ADAPTER = 27  # request names an adapter this node has not loaded
    NOT_HELD = 28  # weights protocol: this peer does not hold that part (or its copy failed verification)
    FORBIDDEN = 29  # a Push from a peer that is not the session's upstream (spec/messages.md §5.10)

    # --- DHT (spec/dht.md) ---
    RECORD_INVALID = 48  # record fails structure checks
    BAD_SIGNATURE = 49  # signature missing/invalid, or signer not allowed for the subkey
    RECORD_TOO_LARGE = 50
    RECORD_EXPIRED = 51
    EXPIRATION_TOO_FAR = 52  # expiration further in the future than the spec allows
    TOO_MANY_RECORDS = 53

    # --- transport and handshake (spec/transport.md) ---
    HANDSHAKE_FAILED = 64  # handshake message malformed or failed to authenticate
    SWARM_KEY_MISMATCH = 65  # peer does not hold the same swarm key (PSK)
    PEER_ID_MISMATCH = 66  # peer authenticated as someone other than the dialled /p2p/ id
    BAD_IDENTITY = 67  # identity key/signature in the handshake payload invalid
    STREAM_RESET = 68
    UNKNOWN_PROTOCOL = 69  # no handler for the requested protocol name
    CONNECTION_CLOSED = 70
    STREAM_STATE = 71  # mux frame not allowed in the stream's state (never opened, data after FIN)
    FRAME_AUTH_FAILED = 72  # secure-channel frame failed to authenticate (tampered, truncated, out of sync)


class ProtocolError(Exception):
    """Base of every error this project raises about protocol rules."""

    def __init__(self, code: ErrorCode | int, message: str) -> None:
        try:
            code = ErrorCode(code)
        except ValueError:
            pass  # an unknown code from a newer peer stays a plain int
        self.code = code
        self.message = message
        super().__init__(f"[{_code_name(code)}] {message}")


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message that violates the spec."""


class LocalProtocolError(ProtocolError):
    """Our own caller tried to send or do something the spec forbids."""


def _code_name(code: ErrorCode | int) -> str:
    return code.name if isinstance(code, ErrorCode) else f"code {code}"
