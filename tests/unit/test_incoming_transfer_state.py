"""An expected transfer's state, from what arrived, what is still being written and held."""

from __future__ import annotations

import numpy as np

from pdcluster.kv_transfer.incoming_transfers import ExpectedTransfer, IncomingState

NOW = 100.0


def transfer(received: bool, **fields) -> ExpectedTransfer:
    blocks = np.full((2, 3), received, dtype=bool)
    return ExpectedTransfer("t", "r", [1, 2, 3], 0, deadline=NOW + 10, producer="p", received=blocks, **fields)


def test_states():
    assert transfer(False).state(NOW) == IncomingState.AWAITED
    assert transfer(True).state(NOW) == IncomingState.COMPLETE
    assert transfer(False, failure="aborted").state(NOW) == IncomingState.FAILED
    # Ended, but its blocks are not vLLM's yet: a chunk write in flight, or a NIXL writer's hold.
    assert transfer(True, writers=1).state(NOW) == IncomingState.LANDING
    assert transfer(False, failure="corrupt", writers=1).state(NOW) == IncomingState.LANDING
    assert transfer(True, hold_until=NOW + 1).state(NOW) == IncomingState.HELD
    assert transfer(True, hold_until=NOW - 1).state(NOW) == IncomingState.COMPLETE
    assert transfer(False, failure="writer lost", hold_until=NOW + 1).state(NOW) == IncomingState.HELD
