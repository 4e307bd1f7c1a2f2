"""The benchmark's measurement of what one change of a large dataset costs (issue 14)."""

from __future__ import annotations

from poolloader.bench import _control_cost


def test_one_change_of_a_large_dataset_costs_a_small_message_in_every_process():
    found = _control_cost.measure(2, lambda line: None, rows=20_000)
    assert found["change_bytes"] < 200, "a change travels alone, not with the dataset"
    assert found["snapshot_every_bytes"] >= 2**20
    assert all(found[k] > 0 for k in ("assign_main_ms", "assign_worker_ms", "set_epoch_main_ms"))
    lines = _control_cost.lines({f"large_{k}": v for k, v in found.items()})
    assert lines[0].startswith("  one change of a 20,000-row dataset: loader.dataset.epoch = k")
