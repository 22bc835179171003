"""A deliberately broken ``biopetals-node`` for tests/test_conformance.py: it must fail the matching checks.

    BIOPETALS_BROKEN=duplicates,position-code,signatures python tests/broken_node.py <biopetals-node arguments>

- ``duplicates``: runs a Step or Push whose step_id was already processed (spec/messages.md §5.7
  says it MUST NOT);
- ``position-code``: answers a position error with INVALID_FIELD instead of BAD_POSITION (§5.6);
- ``signatures``: its DHT stores records whose signature does not verify (spec/dht.md §4.5, §4.6);
- ``corrupt-chunks``: serves weight chunks with one byte flipped (spec/weights.md §3: an honest node
  hashes what it serves; fetchers MUST detect this), for tests/test_weights_swarm.py;
- ``wrong-shape``: returns every ``StepResult`` to its client one hidden unit short (the push to the next
  node stays correct), for tests/test_bad_answers.py (spec/messages.md §5.5: the client's failure to handle);
- ``extra-result``: after each ``StepResult`` also sends one for a step nobody asked for (§5.5);
- ``non-finite``: sends each ``StepResult`` (f32) with a NaN in it (§7.3);
- ``corrupt``: adds noise as large as the output itself to the output of a fraction
  ``BIOPETALS_CORRUPT_RATE`` (default 1) of its inference steps, drawn with ``BIOPETALS_CORRUPT_SEED``
  (default 4: at rate 0.1 the 5th step it computes is the first corrupted one); the corrupted
  output is what it answers and pushes; its ``Forward`` answers and ``Backward`` input gradients are
  corrupted the same way (same draws), for tests/test_verification_swarm.py (client/verification.py);
- ``fast-liar``: announces 10^9 tokens/s whatever it measured, so that routes choose it;
- ``revision-3``: a node of spec/messages.md revision 3: no ``rollback`` nor ``keepalive`` (revision 5) in
  ``SessionOpened`` or ``NodeInfo``, ``Step.truncate`` ignored (a step below the cache is then ``BAD_POSITION``), for tests/test_speculative.py;
- ``slow``: takes ``BIOPETALS_SLOW_STEP`` seconds (default 1) more for every inference step, for
  tests/test_measured_routing.py (with ``fast-liar``: slow but announcing itself fast);
- ``slow-prefill``: the same, for inference steps of more than one token only (a long prefill on a slow
  node; its decode steps run at full speed), for tests/test_keepalive_chain.py.

Everything else is the real node (``biopetals.node.cli.main``), patched in this process only.
"""

from __future__ import annotations

import os
import sys

from biopetals.node import sessions
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError


def break_duplicates() -> None:
    assert hasattr(sessions.Session, "is_duplicate"), "node/sessions.py changed: update tests/broken_node.py"
    sessions.Session.is_duplicate = lambda self, step_id: False


def break_position_code() -> None:
    original = sessions.Session.check_step

    def check_step(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except RemoteProtocolError as exc:
            if exc.code == ErrorCode.BAD_POSITION:
                raise RemoteProtocolError(ErrorCode.INVALID_FIELD, exc.message) from None
            raise

    sessions.Session.check_step = check_step


def break_signatures() -> None:
    from biopetals.dht import storage

    original = storage.validate

    def validate(record, now):
        try:
            original(record, now)
        except RemoteProtocolError as exc:
            if exc.code != ErrorCode.BAD_SIGNATURE:
                raise

    storage.validate = validate
    storage.check_sender = lambda record, sender: None  # nor ask that the signer sent it (§5.4)


def break_chunks() -> None:
    from biopetals.weights import local

    original = local.LocalWeights.read_chunk

    def read_chunk(self, part, index):
        data = bytearray(original(self, part, index))
        data[len(data) // 2] ^= 0x40
        return bytes(data)

    local.LocalWeights.read_chunk = read_chunk


def break_result_shape() -> None:
    from biopetals.node import session_machine
    from biopetals.protocol.messages import StepResult

    original = session_machine.SessionMachine.step_done

    def step_done(self, *args, **kwargs):
        actions = original(self, *args, **kwargs)
        for i, action in enumerate(actions):
            if isinstance(action, session_machine.Send) and isinstance(action.message, StepResult):
                m = action.message
                short = StepResult(session_id=m.session_id, step_id=m.step_id, hidden=m.hidden[..., :-1].contiguous())
                actions[i] = session_machine.Send(action.to, short, action.codec)
        return actions

    session_machine.SessionMachine.step_done = step_done


def extra_results() -> None:
    from biopetals.node import session_machine
    from biopetals.protocol.messages import StepResult

    original = session_machine.SessionMachine.step_done

    def step_done(self, *args, **kwargs):
        actions = original(self, *args, **kwargs)
        for action in list(actions):
            if isinstance(action, session_machine.Send) and isinstance(action.message, StepResult):
                m = action.message
                extra = StepResult(session_id=m.session_id, step_id=m.step_id + 1000, hidden=m.hidden)
                actions.append(session_machine.Send(action.to, extra, action.codec))
        return actions

    session_machine.SessionMachine.step_done = step_done


def non_finite_results() -> None:
    from biopetals.node import handler
    from biopetals.protocol.messages import StepResult

    original = handler.encode_message

    def encode_message(message, codec=None):
        data = original(message, codec)
        if isinstance(message, StepResult) and codec == "f32":
            values = message.hidden.detach().to("cpu").float().contiguous().numpy().tobytes()
            at = data.find(values)
            if at >= 0:  # the first value becomes a NaN (f32, little-endian)
                data = data[:at] + b"\x00\x00\xc0\x7f" + data[at + 4:]
        return data

    handler.encode_message = encode_message


def corrupt_steps() -> None:
    import random

    import torch

    from biopetals.node import handler, session_machine
    from biopetals.protocol.messages import BackwardResult, ForwardResult

    rate = float(os.environ.get("BIOPETALS_CORRUPT_RATE", "1.0"))
    draws = random.Random(int(os.environ.get("BIOPETALS_CORRUPT_SEED", "4")))

    def corrupt(out, seed):
        if draws.random() >= rate:
            return out
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        return out + (noise * out.float().std()).to(out.dtype)

    step_done = session_machine.SessionMachine.step_done
    session_machine.SessionMachine.step_done = lambda self, session_id, step_id, out, now: step_done(
        self, session_id, step_id, corrupt(out, step_id), now)
    forward = handler.NodeService._forward

    async def _forward(self, request):
        reply = await forward(self, request)
        return ForwardResult(hidden=corrupt(reply.hidden, 0))

    handler.NodeService._forward = _forward
    backward = handler.NodeService._backward

    async def _backward(self, request):
        reply = await backward(self, request)
        return BackwardResult(grad_inputs=corrupt(reply.grad_inputs, 1), grad_prompts=reply.grad_prompts)

    handler.NodeService._backward = _backward


def lie_about_speed() -> None:
    from biopetals.node import server

    server.measure_throughput = lambda span: (1e9, 1e9)


def slow_steps(min_tokens: int = 1) -> None:
    import asyncio

    from biopetals.node import handler

    delay = float(os.environ.get("BIOPETALS_SLOW_STEP", "1.0"))
    original = handler.NodeService._run_step

    async def _run_step(self, run):
        if run.step.tokens >= min_tokens:
            await asyncio.sleep(delay)
        return await original(self, run)

    handler.NodeService._run_step = _run_step


def revision_3() -> None:
    import dataclasses

    from biopetals.node import handler, session_machine

    def without_rollback(cls):
        return lambda **fields: cls(**{k: v for k, v in fields.items() if k not in ("rollback", "keepalive")})

    session_machine.SessionOpened = without_rollback(session_machine.SessionOpened)
    handler.NodeInfo = without_rollback(handler.NodeInfo)
    original = sessions.Session.check_step

    def check_step(self, step, *args, **kwargs):
        return original(self, dataclasses.replace(step, truncate=None), *args, **kwargs)

    sessions.Session.check_step = check_step


def main() -> int:
    broken = {b for b in os.environ.get("BIOPETALS_BROKEN", "").split(",") if b}
    for name in broken:
        {"duplicates": break_duplicates, "position-code": break_position_code, "signatures": break_signatures,
         "corrupt-chunks": break_chunks, "wrong-shape": break_result_shape, "extra-result": extra_results,
         "non-finite": non_finite_results, "fast-liar": lie_about_speed, "corrupt": corrupt_steps,
         "slow": slow_steps, "slow-prefill": lambda: slow_steps(min_tokens=2),
         "revision-3": revision_3}[name]()
    from biopetals.node.cli import main as node_main

    return node_main()


if __name__ == "__main__":
    sys.exit(main())
