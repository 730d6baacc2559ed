"""docs/architecture.md shows every state, status and transition of failback/choices.py, as the code has them."""

import re
from pathlib import Path

from failback.choices import TRANSITIONS, ReplicaState, SessionStatus

DOC = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
NONE = "—"


def mermaid_edges(containing):
    """(from, to, label) of every `a --> b : label` line in the doc's mermaid diagram that mentions `containing`."""
    blocks = [b for b in re.findall(r"```mermaid\n(.*?)```", DOC, re.S) if containing in b]
    assert len(blocks) == 1, f"expected one mermaid diagram with {containing!r}, found {len(blocks)}"
    return set(re.findall(r"^\s*(\S+)\s*-->\s*(\S+)\s*:\s*(\w+)", blocks[0], re.M))


def transition_rows():
    """{action: (sources, target, replica cell)} from the table whose rows start with a backticked action."""
    rows = {}
    for line in DOC.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        action = re.fullmatch(r"`(\w+)`", cells[0]) if line.startswith("| `") and len(cells) >= 4 else None
        # A transition's row, or a stale one: an unknown action between statuses in backticks.
        if action and (action.group(1) in TRANSITIONS or re.fullmatch(r"(`\w+`(, )?)+", cells[1])):
            rows[action.group(1)] = (set(re.findall(r"`(\w+)`", cells[1])), cells[2].strip("`"), cells[3])
    return rows


def test_every_status_and_state_is_named_with_its_label():
    for status in SessionStatus:
        assert f"**{status.label}**" in DOC, f"session status {status.label} ({status.value}) missing"
        assert f"`{status.value}`" in DOC, status.value
    for state in ReplicaState:
        assert f"**{state.label}**" in DOC, f"replica state {state.label} ({state.value}) missing"


def test_every_transition_is_named():
    for action in TRANSITIONS:
        assert f"`{action}`" in DOC, f"transition {action} missing from docs/architecture.md"


def test_the_transition_table_matches_the_code():
    rows = transition_rows()
    assert set(rows) == set(TRANSITIONS), f"table rows {sorted(rows)} vs TRANSITIONS {sorted(TRANSITIONS)}"
    for action, spec in TRANSITIONS.items():
        sources, target, replica = rows[action]
        assert sources == {s.value for s in spec.sources}, f"{action}: the doc says from {sources}"
        assert target == spec.target.value, f"{action}: the doc says to {target}"
        if spec.replica_to:
            moved = f"{ReplicaState(spec.replica_from).label} → {ReplicaState(spec.replica_to).label}"
            assert replica.startswith(moved), f"{action}: the doc says the replica {replica!r}, the code {moved}"
        else:
            assert replica.startswith(NONE), f"{action}: the doc moves the replica ({replica!r}); the code does not"


def test_the_session_diagram_shows_every_transition_and_no_other():
    edges = mermaid_edges("[*] --> queued")
    expected = {
        (source.value, spec.target.value, action) for action, spec in TRANSITIONS.items() for source in spec.sources
    }
    expected.add(("[*]", SessionStatus.QUEUED.value, "start_failback"))
    assert edges == expected, f"missing {expected - edges}, extra {edges - expected}"
    for status in SessionStatus:  # each drawn with its label
        assert f'state "{status.label}" as {status.value}' in DOC, status.label


def test_the_replica_diagram_shows_every_replica_change_and_no_other():
    edges = mermaid_edges("declare_failover")
    expected = {(spec.replica_from, spec.replica_to, action) for action, spec in TRANSITIONS.items() if spec.replica_to}
    expected.add(
        (ReplicaState.READY.value, ReplicaState.FAILOVER.value, "declare_failover")
    )  # the one change outside TRANSITIONS
    assert edges == expected, f"missing {expected - edges}, extra {edges - expected}"
