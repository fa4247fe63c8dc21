"""Bookkeeping of proxy-tuning state over vLLM's persistent batch (no model, no vLLM engine).

`RequestTable` is checked against a reference model of vLLM's batch (a plain list of request
names, changed by the same add / remove / move operations), over hand-written sequences and
Hypothesis-generated ones; every state created is freed exactly once.
"""

from __future__ import annotations

import torch
from fedpersona.service.proxy_tuning.state import KVStream, RequestState, RequestTable
from hypothesis import given, settings
from hypothesis import strategies as st


def _state(name: str) -> RequestState:
    state = RequestState(expert_key=name, alpha=1.0, prompt=[1, 2, 3], output=[])
    # Pretend it has run: caches and logits that release() must drop.
    kv = torch.zeros(1, 2, 3, 4)
    state.base = KVStream(past=((kv, kv),), length=3, last_logits=torch.zeros(10))
    state.tuned = KVStream(past=((kv, kv),), length=3, last_logits=torch.zeros(10))
    return state


def _names(table: RequestTable) -> dict[int, str]:
    return {row: s.expert_key for row, s in table.rows.items()}


def test_add_remove_frees_and_counts() -> None:
    table = RequestTable()
    a, b = _state("a"), _state("b")
    table.update(batch_size=3, removed=[], added=[(0, a), (1, None), (2, b)], moved=[])
    assert _names(table) == {0: "a", 2: "b"}
    assert table.stats()["kv_bytes"] > 0
    table.update(batch_size=3, removed=[0], added=[], moved=[])
    assert _names(table) == {2: "b"}
    assert a.base.past is None and a.tuned.past is None and a.expert is None
    assert (table.created, table.freed) == (2, 1)
    # A state left on a row beyond the batch (vLLM never does this) is dropped, not leaked.
    table.update(batch_size=2, removed=[], added=[], moved=[])
    assert table.stats() == {"live_requests": 0, "created": 2, "freed": 2, "kv_bytes": 0}


def test_added_request_replaces_the_row_of_an_old_one() -> None:
    table = RequestTable()
    old, new = _state("old"), _state("new")
    table.update(batch_size=1, removed=[], added=[(0, old)], moved=[])
    table.update(batch_size=1, removed=[], added=[(0, new)], moved=[])
    assert _names(table) == {0: "new"}
    assert old.base.past is None and table.freed == 1
    # A request without an expert taking the row frees the previous state too.
    table.update(batch_size=1, removed=[], added=[(0, None)], moved=[])
    assert table.rows == {} and table.freed == 2


def test_swap_and_one_way_move() -> None:
    table = RequestTable()
    a, b, c = _state("a"), _state("b"), _state("c")
    table.update(batch_size=3, removed=[], added=[(0, a), (1, b), (2, c)], moved=[])
    table.update(batch_size=3, removed=[], added=[], moved=[(0, 2, True)])
    assert _names(table) == {0: "c", 1: "b", 2: "a"}
    # Condense: row 1 finished, the last request slides down into it.
    table.update(batch_size=2, removed=[1], added=[], moved=[(2, 1, False)])
    assert _names(table) == {0: "c", 1: "a"}
    assert b.base.past is None and a.base.past is not None
    # Swap with a row that has no expert request moves one state, creates nothing.
    table.update(batch_size=2, removed=[], added=[(1, None)], moved=[(0, 1, True)])
    assert _names(table) == {1: "c"}
    assert table.created == 3 and table.freed == 2


def test_one_way_move_onto_an_occupied_row_frees_the_overwritten_state() -> None:
    table = RequestTable()
    a, b = _state("a"), _state("b")
    table.update(batch_size=2, removed=[], added=[(0, a), (1, b)], moved=[])
    table.update(batch_size=1, removed=[], added=[], moved=[(1, 0, False)])
    assert _names(table) == {0: "b"}
    assert a.base.past is None and table.freed == 1


# ------------------------------------------------------------------ against a reference batch

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.booleans()),
        st.tuples(st.just("finish"), st.integers(0, 7)),
        st.tuples(st.just("swap"), st.integers(0, 7), st.integers(0, 7)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_table_follows_a_reference_batch(ops: list[tuple]) -> None:
    """Drive the table like vLLM's InputBatch does (fill freed rows first, condense by one-way
    moves from the end, swaps) and compare with a plain list of requests."""
    table = RequestTable()
    batch: list[tuple[str, bool]] = []  # (request name, uses an expert)
    states: dict[str, RequestState] = {}
    counter = 0
    for op in ops:
        removed: list[int] = []
        added: list[tuple[int, RequestState | None]] = []
        moved: list[tuple[int, int, bool]] = []
        if op[0] == "add" and len(batch) < 8:
            counter += 1
            name, uses = f"r{counter}", op[1]
            batch.append((name, uses))
            state = _state(name) if uses else None
            if state is not None:
                states[name] = state
            added.append((len(batch) - 1, state))
        elif op[0] == "finish" and batch:
            row = op[1] % len(batch)
            removed.append(row)
            last = len(batch) - 1
            if row != last:  # condense: the last request slides into the hole
                batch[row] = batch[last]
                moved.append((last, row, False))
            batch.pop()
        elif op[0] == "swap" and len(batch) >= 2:
            i, j = op[1] % len(batch), op[2] % len(batch)
            if i != j:
                batch[i], batch[j] = batch[j], batch[i]
                moved.append((i, j, True))
        table.update(batch_size=len(batch), removed=removed, added=added, moved=moved)
        expected = {row: name for row, (name, uses) in enumerate(batch) if uses}
        assert _names(table) == expected
        live = set(expected.values())
        for name, state in states.items():
            assert (state.base.past is not None) == (name in live), name
    assert table.created == len(states)
    assert table.freed == len(states) - len(table)
