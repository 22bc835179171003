"""Fuzz targets for the stream multiplexer's frame decoder (spec/transport.md §3.2-§3.9).

Invariants (h11's): any input is either accepted or raises RemoteProtocolError, and
the outcome is the same whether the bytes arrive at once or one by one. The stateful
target also plays the application: it consumes every byte it receives (so window
updates are generated) and answers by draining ``data_to_send``, which must itself
decode as frames.
"""

from __future__ import annotations

from biopetals.protocol.errors import RemoteProtocolError
from biopetals.protocol.mux import DataReceived, Mux, decode_frames


def _run(mux: Mux, chunks: list[bytes]) -> tuple[str, list[str]]:
    seen: list[str] = []
    try:
        for chunk in chunks:
            for event in mux.receive_data(chunk):
                if isinstance(event, DataReceived):
                    mux.consumed(event.stream_id, len(event.data))
                    seen.append(f"data {event.stream_id} {bytes(event.data).hex()}")
                else:
                    seen.append(repr(event))
    except RemoteProtocolError as exc:
        return f"error {int(exc.code)}", seen
    return "ok", seen


def _merged(events: list[str]) -> list[str]:
    """Events with consecutive data of one stream joined (byte by byte, data comes in pieces)."""
    out: list[str] = []
    for event in events:
        if event.startswith("data ") and out and out[-1].startswith("data ") and out[-1].split()[1] == event.split()[1]:
            out[-1] += event.split()[2] if len(event.split()) > 2 else ""
        else:
            out.append(event)
    return out


def mux_receive(data: bytes) -> None:
    """Both roles, whole and byte by byte: same events, same outcome; output re-decodes."""
    for initiator in (False, True):
        whole = Mux(initiator=initiator)
        outcome, events = _run(whole, [data])
        decode_frames(whole.data_to_send())  # what we answer is well-formed
        split = Mux(initiator=initiator)
        split_outcome, split_events = _run(split, [data[i : i + 1] for i in range(len(data))])
        if outcome != split_outcome:
            raise AssertionError(f"outcome differs when fed byte by byte: {outcome} vs {split_outcome}")
        # The fast paths for whole frames see what _parse sees. (After an error, receive_data
        # drops the events of the failing call, so only successful inputs are compared.)
        if outcome == "ok" and _merged(events) != _merged(split_events):
            raise AssertionError(f"events differ when fed byte by byte: {events} vs {split_events}")
    if outcome.startswith("error"):
        raise RemoteProtocolError(int(outcome.split()[1]), "invalid mux input")


def mux_frames(data: bytes) -> None:
    """The stateless frame decoder alone."""
    decode_frames(data)


TARGETS = {
    "mux_receive": (mux_receive, ["mux.json"]),
    "mux_frames": (mux_frames, ["mux.json"]),
}
