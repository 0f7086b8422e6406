"""The fault suite: every probe in tests/faults/probes.py is a refusal with a named error or a harmless
fault checked to be harmless, never a silent wrong result, an unclear error or a crash; and kill -9 at
20 random moments while training never leaves a file that reads as a whole artifact when it is not."""

from __future__ import annotations

import pytest

from tests.faults.probes import PROBES, kill_trials, run_probe


@pytest.mark.parametrize("probe", PROBES, ids=[p.id for p in PROBES])
def test_probe(probe, tmp_path):
    outcome = run_probe(probe, tmp_path)
    assert outcome.ok, f"{probe.id}: {outcome.kind}: {outcome.detail}"


def test_kill_9_twenty_times(tmp_path):
    r = kill_trials(tmp_path, 20, seed=20)
    assert r["read_as_whole_wrongly"] == [], r
    assert r["next_session_bitwise_equal"], r
    assert r["killed_while_writing"] >= 5, r  # kills landed while the artifact was being written (8 and 10 of 20 here)
