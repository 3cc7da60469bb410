"""The evaluation schedule (eval_every, eval_offset), the --stop-at rule and best-so-far; pure."""

from __future__ import annotations

import pytest

from train.plan.dry_run import epoch_rows
from train.plan.evals import eval_epochs, evaluates_after, is_new_best, stop_reached
from train.plan.schedule import Schedule


@pytest.mark.parametrize(
    ("num_epochs", "every", "offset", "expected"),
    [
        (5, 1, 0, [0, 1, 2, 3, 4]),  # today's default: every epoch
        (7, 3, 0, [2, 5, 6]),  # after 3 and 6 epochs done, and the last
        (10, 4, 3, [2, 6, 9]),  # MLPerf-style: after 3, 7 epochs done, then the last
        (6, 2, 1, [0, 2, 4, 5]),  # after 1, 3, 5 epochs done, and the 6th (last)
        (4, 10, 0, [3]),  # eval_every beyond the run: the last only
        (5, 1, 3, [2, 3, 4]),  # nothing before the offset
    ],
)
def test_evaluates_after(num_epochs, every, offset, expected) -> None:
    assert eval_epochs(num_epochs, every, offset) == expected
    assert [evaluates_after(e, num_epochs, every, offset) for e in range(num_epochs)] == [
        e in expected for e in range(num_epochs)
    ]


def test_dry_run_rows_mark_the_evaluations() -> None:
    schedule = Schedule.from_dicts(
        [{"epochs": [0, 6], "prep_size": 160, "crop_size": 32, "batch_size": 8, "lr": 0.1}]
    )
    marked = [r.epoch for r in epoch_rows(schedule, 2, 1) if r.evaluates]
    assert marked == [0, 2, 4, 5]


def test_stop_at_needs_every_threshold() -> None:
    top = {"top1": 75.95, "top5": 92.0}
    assert stop_reached(top, [("top1", 75.9)])
    assert stop_reached(top, [("top1", 75.95)])  # reached means >=
    assert not stop_reached(top, [("top1", 75.9), ("top5", 93.0)])  # all must be reached
    assert not stop_reached(top, [])  # no --stop-at: never
    assert not stop_reached({"top1": None, "top5": None}, [("top1", 1.0)])  # no evaluation


def test_best_is_the_first_highest_top1() -> None:
    earlier = [{"top1": 50.0}, {"top1": None}, {"top1": 80.0}]
    assert is_new_best([], {"top1": 10.0})
    assert is_new_best(earlier, {"top1": 80.5})
    assert not is_new_best(earlier, {"top1": 80.0})  # a tie keeps the earlier epoch
    assert not is_new_best(earlier, {"top1": None})  # an epoch without evaluation
