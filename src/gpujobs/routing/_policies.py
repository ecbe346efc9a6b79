"""Routing policies: which runner a job goes to first, and in which order the others follow.

A policy sees one :class:`Candidate` per runner that may take the job now (its breaker admits
it, its bulkhead has room, it was not tried for this job yet), in the order the routes were
given, and returns them in the order to try, each with a short reason for the events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gpujobs.routing._estimates import RunnerStats

__all__ = ["Candidate", "Failover", "Overflow", "RoutingPolicy"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A runner that could take the job: its place in the route list, name and statistics."""

    index: int
    name: str
    stats: RunnerStats


class RoutingPolicy(Protocol):
    """Orders the candidates for one job. ``deadline_left_s`` is ``None`` without a deadline."""

    def order(
        self, candidates: Sequence[Candidate], *, now: float, deadline_left_s: float | None
    ) -> list[tuple[Candidate, str]]:
        """The candidates in the order to try them, each with the reason it stands there."""
        ...


class Failover:
    """The routes in the order given: the first that can take the job gets it."""

    def order(
        self, candidates: Sequence[Candidate], *, now: float, deadline_left_s: float | None
    ) -> list[tuple[Candidate, str]]:
        """The candidates as given."""
        del now, deadline_left_s
        return [(c, "first in order" if c.index == 0 else "next in order") for c in candidates]


@dataclass(frozen=True, slots=True)
class Overflow:
    """Cold-start-aware overflow from a primary (the first route) to the others.

    The primary keeps the job while its expected finish (jobs ahead × observed service time,
    see :meth:`RunnerStats.expected_finish_s`) beats the best other runner's expected finish
    (P(cold) × cold start + service) by no more than ``margin_s``, or while the job still
    finishes within ``deadline_share`` of the caller's deadline (or ``max_wait_s``, when the
    caller gave no deadline) — the primary is paid for anyway, so waiting for it costs nothing.
    Otherwise the job overflows to the runner expected to finish first.

    ``cold_path=True`` compares the primary with the other runners' finish *on a cold worker*
    (cold start + service) rather than their expected finish: the primary keeps a job as long
    as it beats a cold start. In a burst the next serverless worker is cold anyway (the warm
    ones are busy), and the latency tail is set by cold starts either way, so this keeps more
    jobs on the paid-for primary for about the same tail (``benches/routing.py`` measures
    both against a clairvoyant schedule; docs/routing-simulation.md).
    """

    margin_s: float = 0.0
    deadline_share: float = 0.8
    max_wait_s: float | None = None
    cold_path: bool = False

    def order(
        self, candidates: Sequence[Candidate], *, now: float, deadline_left_s: float | None
    ) -> list[tuple[Candidate, str]]:
        """Primary first while it is good enough, else the fastest other runner first."""
        if not candidates:
            return []
        expected = {
            c.index: c.stats.expected_finish_s(now, cold=self.cold_path and c.index != 0)
            for c in candidates
        }
        by_speed = sorted(candidates, key=lambda c: (expected[c.index], c.index))
        primary = candidates[0]
        if primary.index != 0:  # the primary cannot take it: fastest first
            return [(c, "primary unavailable; fastest expected") for c in by_speed]
        others = [c for c in by_speed if c.index != 0]
        e_primary = expected[0]
        if not others:
            return [(primary, f"primary, expected {e_primary:.1f} s")]
        best = others[0]
        e_best = expected[best.index]
        budget = (
            self.max_wait_s if deadline_left_s is None else self.deadline_share * deadline_left_s
        )
        if e_primary <= e_best + self.margin_s:
            reason = f"primary: expected {e_primary:.1f} s ≤ {best.name} {e_best:.1f} s"
        elif budget is not None and e_primary <= budget:
            reason = f"primary: expected {e_primary:.1f} s within the {budget:.1f} s budget"
        else:
            cold = " if cold" if self.cold_path else ""
            why = f"primary expected {e_primary:.1f} s > {best.name} {e_best:.1f} s{cold}"
            return [(best, f"overflow: {why}")] + [
                (c, "next fastest") for c in (*others[1:], primary)
            ]
        return [(primary, reason)] + [(c, "next fastest") for c in others]
