"""When a run evaluates (eval_every, eval_offset), when it stops early (--stop-at), and which
evaluation is the best so far (best.pt); pure."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence


def evaluates_after(epoch: int, num_epochs: int, eval_every: int, eval_offset: int = 0) -> bool:
    """Evaluate after 0-based `epoch` when the epochs done (epoch + 1) are eval_offset +
    k * eval_every for some k >= 0 (MLPerf's eval_offset), and always after the last."""
    done = epoch + 1
    if done == num_epochs:
        return True
    return done >= eval_offset and (done - eval_offset) % eval_every == 0


def eval_epochs(num_epochs: int, eval_every: int, eval_offset: int = 0) -> list[int]:
    """The 0-based epochs after which a run of `num_epochs` evaluates (the dry run's column)."""
    return [e for e in range(num_epochs) if evaluates_after(e, num_epochs, eval_every, eval_offset)]


def stop_reached(top: Mapping[str, Any], stop_at: Sequence[tuple[str, float]]) -> bool:
    """--stop-at: every (metric, percent) reached by this evaluation; False without any."""
    return bool(stop_at) and all(
        top.get(metric) is not None and top[metric] >= percent for metric, percent in stop_at
    )


def is_new_best(earlier: Iterable[Mapping[str, Any]], record: Mapping[str, Any]) -> bool:
    """Does `record` beat every earlier evaluation's top-1 (a tie keeps the earlier epoch)?"""
    if record.get("top1") is None:
        return False
    tops = [r["top1"] for r in earlier if r.get("top1") is not None]
    return not tops or record["top1"] > max(tops)
