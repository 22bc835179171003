"""Cache rollback on the node (spec/messages.md §5.6 ``truncate``, revision 4): sans-IO, fake clock.

The session state machine (node/session_machine.py) with the helpers of
tests/test_node_session_machine.py: a ``truncate`` step below the cache's length cuts the
cache to its position (masks of cut columns dropped), a step below the length without it is
``BAD_POSITION``, a duplicate or stale step or push never rolls anything back, and a
``Push`` carries the flag on. The backend's truncation of a real KV cache is checked against
transformers in tests/test_speculative.py.
"""

from __future__ import annotations

import torch
from test_node_session_machine import SID, UP, done, error, h, machine, opened, opening, run, sends, step

from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.identity import Identity
from biopetals.protocol.messages import Error, Hop, Push, PushAck, SessionOpened, StepResult

NEXT_PEER = Identity.generate().peer_id


def test_the_node_says_it_rolls_back():
    m = machine()
    (allocate,) = m.open("client", "peer", opening(), 0.0, b"x")
    (reply,) = m.allocated(allocate.session_id, object(), 0.0)
    assert isinstance(reply.message, SessionOpened) and reply.message.rollback == 1


def test_truncate_cuts_the_cache_to_the_position():
    m = machine()
    opened(m)
    done(m, run(m.receive("client", step(1, 0, 4), 0.0)))  # 4 columns
    # below the cache without truncate: BAD_POSITION, as in revision 3 (§5.6)
    error(m.receive("client", step(5, 2), 0.0), ErrorCode.BAD_POSITION, 5)
    # above the cache even with truncate: BAD_POSITION
    error(m.receive("client", step(6, 5, truncate=1), 0.0), ErrorCode.BAD_POSITION, 6)
    # past max_length after the cut: BAD_POSITION, and the cache is untouched (§2.6)
    error(m.receive("client", step(7, 2, 9, truncate=1), 0.0), ErrorCode.BAD_POSITION, 7)
    assert m.sessions()[0].length == 4
    # truncate at 2 with 3 new tokens: positions 2, 3, 4; the session then holds 5
    cut = run(m.receive("client", step(8, 2, 3, truncate=1), 0.0))
    assert cut.step.position == 2 and cut.step.positions.tolist() == [[2, 3, 4]] and not cut.step.batchable
    done(m, cut)
    assert m.sessions()[0].length == 5 and m.sessions()[0].last_step_id == 8
    # truncate at the cache length is no rollback at all
    same = run(m.receive("client", step(9, 5, truncate=1), 0.0))
    assert same.step.position == 5 and same.step.positions.tolist() == [[5]]
    done(m, same)
    # truncate to 0: the whole cache goes
    zero = run(m.receive("client", step(10, 0, 2, truncate=1), 0.0))
    assert zero.step.positions.tolist() == [[0, 1]]
    done(m, zero)
    assert m.sessions()[0].length == 2


def test_a_failed_rollback_changes_nothing():
    m = machine()
    opened(m)
    done(m, run(m.receive("client", step(1, 0, 4), 0.0)))
    run(m.receive("client", step(2, 1, 1, truncate=1), 0.0))
    error(m.step_failed(SID, 2, Error(code=ErrorCode.NON_FINITE, message="nan", step_id=2)), ErrorCode.NON_FINITE, 2)
    session = m.sessions()[0]
    assert session.length == 4 and session.last_step_id == 1  # §2.6: as before the step
    # the next step continues at 4 (or rolls back again)
    assert run(m.receive("client", step(3, 4), 0.0)).step.position == 4


def test_duplicates_and_stale_pushes_never_roll_back():
    m = machine()
    opened(m)
    done(m, run(m.receive("client", step(1, 0, 3), 0.0)))
    done(m, run(m.receive("client", step(4, 3, 2), 0.0)))  # 5 columns, last id 4
    # a repeated or older step with truncate is a duplicate: not run, no reply (§5.7)
    assert m.receive("client", step(4, 1, truncate=1), 0.0) == []
    assert m.receive("client", step(2, 0, truncate=1), 0.0) == []
    # a stale push with truncate: acknowledged, never run
    stale = Push(session_id=SID, step_id=3, position=1, hidden=h(), truncate=1)
    assert sends(m.push("upstream", UP, stale, 0.0)) == [("upstream", PushAck(session_id=SID, step_id=3))]
    assert m.sessions()[0].length == 5 and not m.sessions()[0].busy
    # the rollback with a fresh id runs; the same push arriving after it is a duplicate
    rolled = Push(session_id=SID, step_id=6, position=3, hidden=h(2), truncate=1)
    done(m, run(m.push("upstream", UP, rolled, 0.0)))
    assert m.sessions()[0].length == 5
    again = m.push("upstream", UP, rolled, 0.0)
    assert len(again) == 1 and sends(again) == [("upstream", PushAck(session_id=SID, step_id=6))]
    assert m.sessions()[0].length == 5 and m.sessions()[0].last_step_id == 6


def test_rollback_drops_the_masks_of_cut_columns():
    m = machine()
    opened(m)
    # columns 0-3: padding, token, token, padding; the row's positions count tokens only (§5.6)
    done(m, run(m.receive("client", step(1, 0, 4, mask=torch.tensor([[0, 1, 1, 0]])), 0.0)))
    assert m.sessions()[0].mask.tolist() == [[False, True, True, False]]
    # cut to 2 (column 3's padding goes), 2 real tokens: positions 1, 2
    cut = run(m.receive("client", step(2, 2, 2, truncate=1), 0.0))
    assert cut.step.mask.tolist() == [[False, True, True, True]] and cut.step.positions.tolist() == [[1, 2]]
    done(m, cut)
    assert m.sessions()[0].mask.tolist() == [[False, True, True, True]]
    # cut to 1 with a padded token: the mask is the kept column plus the new one
    cut = run(m.receive("client", step(3, 1, 1, mask=torch.tensor([[0]]), truncate=1), 0.0))
    assert cut.step.mask.tolist() == [[False, False]] and cut.step.positions.tolist() == [[0]]


def test_a_padded_batch_rolls_back_by_column():
    m = machine()
    opened(m, batch_size=2)
    prefill = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # row 0 left-padded
    done(m, run(m.receive("client", step(1, 0, 4, hidden=h(4, batch=2), mask=prefill), 0.0)))
    done(m, run(m.receive("client", step(2, 4, 2, hidden=h(2, batch=2)), 0.0)))  # 6 columns
    cut = run(m.receive("client", step(3, 5, 1, hidden=h(1, batch=2), truncate=1), 0.0))
    # column 5 is cut in both rows; the new token is row 0's 4th real token, row 1's 6th
    assert cut.step.positions.tolist() == [[3], [5]]
    assert cut.step.mask.tolist() == [[False, False, True, True, True, True], [True] * 6]


def test_push_carries_truncate_on():
    m = machine()
    opened(m)
    done(m, run(m.receive("client", step(1, 0, 3), 0.0)))
    hop = Hop(peer_id=NEXT_PEER, session_id=b"s2", start=4, end=8)
    ran = run(m.receive("client", step(2, 1, 2, next=(hop,), truncate=1), 0.0))
    push_to, send = m.step_done(SID, ran.step_id, torch.ones(1, 2, 8), 0.0)
    assert push_to.push.truncate == 1 and push_to.push.position == 1 and push_to.push.step_id == 2
    assert isinstance(send.message, StepResult)
    ran = run(m.receive("client", step(3, 3, next=(hop,)), 0.0))
    push_to, _ = m.step_done(SID, ran.step_id, torch.ones(1, 1, 8), 0.0)
    assert push_to.push.truncate is None
