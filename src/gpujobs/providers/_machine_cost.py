"""What a rented machine costs: hourly rate × uptime, per job amortised, and marginal."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from gpujobs._models import Cost

__all__ = ["CostBook", "MachineCost"]


class MachineCost(BaseModel):
    """What a rented machine costs, as ``MachineRunner.cost_report()`` reports it.

    Attributes:
        provider: the runner's name.
        hourly_usd: the provider's price, USD per hour (``None`` until known).
        uptime_s: billed seconds of the current run.
        spent_usd: ``hourly_usd`` × ``uptime_s``.
        jobs: jobs completed during the current run.
        amortised_usd_per_job: ``spent_usd`` ÷ ``jobs``: what each job cost, sharing the bill.
        marginal_usd_per_job: what one more job adds to the bill: 0 while the machine is up
            (it bills by the hour whether it works or not); when it is stopped, the price of
            starting it, running the job and the idle tail before it is released again.
        running: whether the machine is up (as far as this runner knows).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str
    hourly_usd: float | None
    uptime_s: float
    spent_usd: float | None
    jobs: int
    amortised_usd_per_job: float | None
    marginal_usd_per_job: float | None
    running: bool


class CostBook:
    """Jobs completed per run of the machine, and how long they ran."""

    def __init__(self) -> None:
        self._generation = 0
        self._jobs = 0
        self._execution_s: list[float] = []

    def jobs(self, generation: int) -> int:
        """Jobs completed during run ``generation``."""
        return self._jobs if generation == self._generation else 0

    def completed(self, generation: int, execution_s: float | None) -> None:
        """A job of run ``generation`` completed after ``execution_s`` seconds of work."""
        if generation != self._generation:
            self._generation, self._jobs = generation, 0
        self._jobs += 1
        if execution_s is not None:
            self._execution_s = [*self._execution_s[-99:], execution_s]

    def amortised(self, hourly_usd: float | None, uptime_s: float, generation: int) -> Cost | None:
        """One job's share of the bill of the current run."""
        if hourly_usd is None:
            return None
        share_s = uptime_s / max(1, self.jobs(generation))
        return Cost(
            usd=hourly_usd * share_s / 3600,
            billed_s=share_s,
            usd_per_s=hourly_usd / 3600,
            basis="amortised",
        )

    def report(self, provider: str, machine: Any, generation: int, **marginal: Any) -> MachineCost:
        """The whole picture; ``marginal``: ``running``, ``start_s``, ``idle_release_s``."""
        hourly, uptime = machine.hourly_usd(), machine.uptime_s()
        spent = None if hourly is None else hourly * uptime / 3600
        jobs = self.jobs(generation)
        running = bool(marginal["running"])
        extra: float | None = 0.0
        if not running:
            runs = self._execution_s
            mean_s = sum(runs) / len(runs) if runs else 0.0
            tail_s = (marginal.get("start_s") or 0.0) + (marginal.get("idle_release_s") or 0.0)
            extra = None if hourly is None else hourly * (mean_s + tail_s) / 3600
        return MachineCost(
            provider=provider,
            hourly_usd=hourly,
            uptime_s=uptime,
            spent_usd=spent,
            jobs=jobs,
            amortised_usd_per_job=None if spent is None or not jobs else spent / jobs,
            marginal_usd_per_job=extra,
            running=running,
        )
