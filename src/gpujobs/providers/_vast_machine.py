"""``VastMachine``: one Vast.ai instance rented for our worker, never two at once.

The life of an instance, as Vast documents it (``docs.vast.ai``: create instance, show
instance(s); checked 2026-11): ``PUT /api/v0/asks/{offer_id}/`` rents an offer and answers
``{"success": true, "new_contract": <instance id>}``; the instance's ``actual_status`` goes
``null`` (provisioning) → ``loading`` (image pull, container start) → ``running``; ``exited``
(the container stopped), ``offline`` (the host went away) and ``stopped`` mean it serves nothing.
A port asked for with ``env={"-p 8000:8000": "1"}`` is reached at ``public_ipaddr`` and
``ports["8000/tcp"][0]["HostPort"]`` once Vast shows the mapping. Storage bills from creation,
the GPU from ``running``; ``dph_total`` is the whole hourly price, ``storage_total_cost`` its
storage part.

Never renting twice: every instance carries this machine's label. Before renting, instances with
the label are adopted (a create whose answer was lost, a previous process's instance); a create
that fails in a way that may have rented (a timeout, a 5xx, a cut connection) is followed by a
look for the label, again for up to ``reconcile_s``, before another offer is tried; extra
instances with the label are destroyed. The create itself is sent once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, TypeVar

import anyio

from gpujobs._errors import (
    AuthenticationError,
    CapacityError,
    ConfigurationError,
    GpuJobsError,
    InvalidInputError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
)
from gpujobs._polling import Deadline, PollSchedule
from gpujobs.providers._vast_api import VastApi, VastInstance, VastOffer
from gpujobs.providers._worker_api import WorkerApi

__all__ = ["VastMachine"]

_log = logging.getLogger("gpujobs")
T = TypeVar("T")
#: ``actual_status`` values of an instance that serves nothing and will not by waiting.
DEAD: Final = frozenset({"exited", "offline", "stopped"})
_WORKER_PORT: Final = 8000
#: Checks in a row that find the worker unreachable while Vast lists it as running: dead.
UNREACHABLE_CHECKS: Final = 3
#: Offers tried, best first, when creates are refused (the offer was taken meanwhile...).
_OFFERS_TRIED: Final = 3
_PRICE_SLACK: Final = 1e-6  # USD per hour: rounding, not a price


class VastMachine:
    """One Vast.ai instance running the worker's pod server: rented, watched, destroyed.

    Satisfies :class:`gpujobs.providers._machine.Machine`. Arguments are those of
    :class:`gpujobs.VastRunner`, which builds it.
    """

    def __init__(
        self,
        api: VastApi,
        *,
        name: str,
        image: str,
        query: str,
        order: str,
        disk_gb: float,
        env: Mapping[str, str],
        label: str,
        max_usd_per_hour: float | None,
        reconcile_s: float,
        poll: PollSchedule,
        worker: WorkerApi,
        request_timeout_s: float,
    ) -> None:
        self.name = label
        self._runner_name = name
        self._api = api
        self._image, self._query, self._order, self._disk_gb = image, query, order, disk_gb
        self._env = dict(env)
        self._label = label
        self._cap = max_usd_per_hour
        self._reconcile_s = reconcile_s
        self._poll = poll
        self._worker = worker
        self._timeout_s = request_timeout_s
        self._lock = anyio.Lock()
        self._start_scope: anyio.CancelScope | None = None
        self.instance_id: int | None = None
        self._url: str | None = None
        self._created_at: float | None = None  # wall clock, as Vast's start_date
        self._running_at: float | None = None
        self._usd_per_h: float | None = None
        self._storage_usd_per_h = 0.0
        self._spent_before = 0.0  # instances already destroyed
        self._touched = False  # whether an instance may exist: release() sweeps only then
        self._unreachable = 0  # checks in a row that found the worker unreachable

    def __repr__(self) -> str:
        return f"VastMachine(label={self._label!r}, instance_id={self.instance_id!r})"

    # -- the Machine protocol ---------------------------------------------------------------------

    async def ready(self, deadline: Deadline) -> str:
        """Adopt or rent an instance, wait until it runs and the worker is healthy; its URL."""
        async with self._lock:
            if self._url is not None:
                return self._url
            with anyio.CancelScope() as scope:
                self._start_scope = scope
                try:
                    self._url = await self._start(deadline)
                finally:
                    self._start_scope = None
            if self._url is None:  # release() stopped the start
                raise ProviderUnavailableError(
                    "the instance was released while starting", provider=self._runner_name
                )
            return self._url

    async def check(self) -> bool:
        """Whether the instance still serves; a dead one is destroyed and forgotten.

        Dead: Vast says it is gone, ``exited``, ``offline`` or ``stopped``, or Vast still lists
        it as running but its worker has not answered ``/health`` for
        :data:`UNREACHABLE_CHECKS` checks in a row (a host cut off from the network).
        """
        instance_id = self.instance_id
        if instance_id is None:
            return False
        found = await self._api.show_instance(instance_id, self._call_deadline())
        if found is not None:
            self._note(found)
        if found is not None and found.actual_status not in DEAD:
            if await self._answers(self._url):
                self._unreachable = 0
                return True
            self._unreachable += 1
            if self._unreachable < UNREACHABLE_CHECKS:
                return True
            why = f"unreachable ({self._unreachable} checks)"
        else:
            why = "gone" if found is None else str(found.actual_status)
        _log.warning("Vast instance %s is %s: destroying it", instance_id, why)
        await self._discard(instance_id)
        return False

    async def _answers(self, url: str | None) -> bool:
        if url is None:
            return True  # still starting: Vast's word is all there is
        try:
            await self._worker.health(url, retry=False)
        except ProviderError:
            return False
        return True

    async def release(self) -> None:
        """Destroy the instance (and any other carrying the label). Idempotent."""
        if self._start_scope is not None:
            self._start_scope.cancel()
        async with self._lock:
            if self.instance_id is not None:
                await self._discard(self.instance_id)
            if not self._touched:
                return
            try:
                for stray in await self._api.instances_labelled(self._label, self._call_deadline()):
                    await self._api.destroy_instance(stray.id, self._call_deadline())
            except GpuJobsError as exc:
                # A safety net, not the release itself: say what may be left behind.
                _log.warning(
                    "could not look for instances labelled %s on Vast (%s); check with "
                    "`vastai show instances`",
                    self._label,
                    exc,
                )
                return
            self._touched = False  # only once the sweep went through

    def hourly_usd(self) -> float | None:
        """The instance's ``dph_total`` (USD per hour, storage included), once known."""
        return self._usd_per_h

    def uptime_s(self) -> float:
        """Billed seconds of the current instance, counted at its full ``dph_total``.

        Vast bills the GPU from ``running`` but storage from creation, so the seconds before
        ``running`` count for the storage share of the price only: ``hourly_usd() × uptime_s()``
        is the instance's bill so far.
        """
        if self._created_at is None:
            return 0.0
        hourly = self._usd_per_h
        if not hourly:
            return max(0.0, time.time() - self._created_at)
        return self._current_usd() * 3600 / hourly

    def spent_usd(self) -> float:
        """What every instance cost so far (destroyed ones included), as Vast bills it."""
        return self._spent_before + self._current_usd()

    def _current_usd(self) -> float:
        """The current instance's bill: storage since creation, the rest since running."""
        if self._created_at is None:
            return 0.0
        now = time.time()
        spent = self._storage_usd_per_h * max(0.0, now - self._created_at) / 3600
        if self._running_at is not None and self._usd_per_h is not None:
            compute = max(0.0, self._usd_per_h - self._storage_usd_per_h)
            spent += compute * max(0.0, now - self._running_at) / 3600
        return spent

    # -- starting -----------------------------------------------------------------------------

    async def _start(self, deadline: Deadline) -> str:
        self._touched = True
        if self.instance_id is None:
            adopted = await self._adopt(deadline)
            if adopted is None:
                await self._rent(deadline)
        assert self.instance_id is not None  # noqa: S101 - _rent raises or sets it
        instance_id = self.instance_id
        began = time.monotonic()
        try:
            url = await self._until(lambda: self._look_running(instance_id), deadline)
            await self._until(lambda: self._look_healthy(instance_id, url), deadline)
        except TimeoutError:
            # An instance that cannot be used bills all the same: never keep it.
            await self._discard(instance_id)
            raise ProviderUnavailableError(
                f"Vast instance {instance_id} was not ready after "
                f"{time.monotonic() - began:.0f} s; destroyed it",
                provider=self._runner_name,
            ) from None
        _log.info("Vast instance %s is ready at %s", instance_id, url)
        return url

    async def _adopt(self, deadline: Deadline) -> int | None:
        """Take over a live instance carrying the label, destroying dead or extra ones."""
        live: list[VastInstance] = []
        for found in await self._api.instances_labelled(self._label, deadline):
            if found.actual_status in DEAD:
                await self._api.destroy_instance(found.id, deadline)
            else:
                live.append(found)
        if not live:
            return None
        keep, *extra = sorted(live, key=lambda i: i.id)
        for duplicate in extra:
            _log.warning(
                "destroying Vast instance %s: a second one labelled %s", duplicate.id, self._label
            )
            await self._api.destroy_instance(duplicate.id, deadline)
        self._record(keep.id, keep.start_date)
        self._note(keep)
        _log.info("adopted Vast instance %s (label %s)", keep.id, self._label)
        return keep.id

    async def _rent(self, deadline: Deadline) -> None:
        offers = await self._api.search_offers(
            self._query, order=self._order, storage_gb=self._disk_gb, deadline=deadline
        )
        affordable = [o for o in offers if self._affordable(o)]
        if not affordable:
            cap = f" at {self._cap:g} $/h or less" if self._cap is not None else ""
            raise CapacityError(
                f"no Vast offer matches {self._query!r}{cap} ({len(offers)} found above the cap)"
                if offers
                else f"no Vast offer matches {self._query!r}{cap}",
                provider=self._runner_name,
            )
        last: GpuJobsError | None = None
        for offer in affordable[:_OFFERS_TRIED]:
            try:
                # Shielded: once Vast has rented, the id must be recorded, or it would be lost.
                with anyio.CancelScope(shield=True):
                    instance_id = await self._api.create_instance(
                        offer.id, image=self._image, disk_gb=self._disk_gb, env=self._env,
                        label=self._label,
                    )  # fmt: skip
                    self._record(instance_id, None)
                    self._usd_per_h = offer.dph_total
            except (AuthenticationError, ConfigurationError):
                raise
            except GpuJobsError as exc:
                _log.warning("renting Vast offer %s failed (%s): reconciling", offer.id, exc)
                wait_s = self._reconcile_s if _may_have_rented(exc) else 0.0
                if await self._reconcile(_earliest(deadline, Deadline.after(wait_s))):
                    return
                last = exc
                continue
            _log.info("rented Vast offer %s as instance %s", offer.id, instance_id)
            return
        assert last is not None  # noqa: S101 - the loop ran at least once
        raise last

    def _affordable(self, offer: VastOffer) -> bool:
        if self._cap is None:
            return True
        if offer.dph_total is None or offer.dph_total > self._cap:
            _log.info("refusing Vast offer %s at %s $/h: above the cap", offer.id, offer.dph_total)
            return False
        return True

    async def _reconcile(self, until: Deadline) -> bool:
        """Look for an instance with the label until one shows or ``until`` passes."""
        intervals = self._poll.intervals()
        while True:
            if await self._adopt(self._call_deadline()) is not None:
                return True
            if until.expired:
                return False
            await anyio.sleep(until.cap(next(intervals)))

    async def _look_running(self, instance_id: int) -> str | None:
        found = await self._api.show_instance(instance_id, self._call_deadline())
        if found is None or found.actual_status in DEAD:
            await self._discard(instance_id)
            why = "disappeared" if found is None else f"is {found.actual_status}"
            raise ProviderUnavailableError(
                f"Vast instance {instance_id} {why} while starting", provider=self._runner_name
            )
        self._note(found)
        if self._cap is not None and (found.dph_total or 0.0) > self._cap + _PRICE_SLACK:
            # Priced above the cap after the search (the host raised its price): not kept.
            await self._discard(instance_id)
            raise CapacityError(
                f"Vast instance {instance_id} costs {found.dph_total:g} $/h, above the cap of "
                f"{self._cap:g} $/h; destroyed it",
                provider=self._runner_name,
            )
        port = found.host_port(_WORKER_PORT)
        if found.actual_status != "running" or port is None or not found.public_ipaddr:
            return None
        return f"http://{found.public_ipaddr}:{port}"

    async def _look_healthy(self, instance_id: int, url: str) -> bool | None:
        try:
            health = await self._worker.health(url, retry=False)
        except ProviderError:
            # Not listening yet, or the instance died: Vast knows which.
            await self._look_running(instance_id)
            return None
        status = health.get("status")
        if status == "error":
            await self._discard(instance_id)
            raise ProviderUnavailableError(
                f"the worker on Vast instance {instance_id} failed to start: "
                f"{str(health.get('error', 'no reason given'))[:300]}; destroyed the instance",
                provider=self._runner_name,
                retryable=False,
            )
        return None if status == "loading" else True

    async def _until(self, look: Callable[[], Awaitable[T | None]], until: Deadline) -> T:
        """Call ``look`` on the poll schedule until it gives an answer; ``TimeoutError`` else."""
        intervals = self._poll.intervals()
        while True:
            with anyio.move_on_after(until.remaining()):
                answer = await look()
                if answer is not None:
                    return answer
            if until.expired:
                raise TimeoutError
            await anyio.sleep(until.cap(next(intervals)))

    # -- bookkeeping ----------------------------------------------------------------------------

    def _record(self, instance_id: int, created_at: float | None) -> None:
        self.instance_id, self._unreachable = instance_id, 0
        self._created_at = created_at or time.time()
        self._running_at = None

    def _note(self, found: VastInstance) -> None:
        if found.dph_total is not None:
            self._usd_per_h = found.dph_total
        if found.storage_total_cost is not None:
            self._storage_usd_per_h = found.storage_total_cost
        if found.actual_status == "running" and self._running_at is None:
            self._running_at = time.time()

    async def _discard(self, instance_id: int) -> None:
        """Destroy the instance and forget it (only if it is still the current one).

        Forgotten even when the destroy fails: it can serve nothing; :meth:`release` sweeps the
        label again.
        """
        if self.instance_id == instance_id:
            self._spent_before = self.spent_usd()
            self.instance_id = self._url = self._created_at = self._running_at = None
        with anyio.CancelScope(shield=True):
            await self._api.destroy_instance(instance_id, self._call_deadline())

    def _call_deadline(self) -> Deadline:
        return Deadline.after(self._timeout_s * 3)


def _earliest(a: Deadline, b: Deadline) -> Deadline:
    ats = [d.at for d in (a, b) if d.at is not None]
    return Deadline(min(ats) if ats else None)


def _may_have_rented(exc: GpuJobsError) -> bool:
    """Whether a failed create may still have rented: anything but a clean refusal."""
    if isinstance(exc, (AuthenticationError, InvalidInputError, RateLimitedError)):
        return False
    if isinstance(exc, ProviderError):
        if not exc.request_sent:
            return False
        status = exc.status_code
        return status is None or status >= 500 or status == 408  # noqa: PLR2004
    return True
