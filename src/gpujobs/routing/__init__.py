"""Routing jobs over several runners: failover, overflow, hedging, breakers, budgets, batches.

::

    from gpujobs.routing import Overflow, Priors, Route, Router

    router = Router(
        [Route(pod, priors=Priors(concurrency=1, service_s=20)),
         Route(serverless, priors=Priors(cold_start_s=40, cold_probability=0.3))],
        policy=Overflow(),
    )
    result = await router.run(payload, timeout=300)

``Router`` is also exported from ``gpujobs`` itself.
"""

from gpujobs.routing._batch import BatchResults, run_batch
from gpujobs.routing._breaker import BreakerConfig, BreakerState, CircuitBreaker
from gpujobs.routing._budget import RetryBudget, RetryBudgetConfig
from gpujobs.routing._estimates import Priors, RunnerStats
from gpujobs.routing._events import EventKind, LoggingHook, RouterEvent, RouterHook
from gpujobs.routing._lanes import Hedge, Route
from gpujobs.routing._policies import Candidate, Failover, Overflow, RoutingPolicy
from gpujobs.routing._router import DEFAULT_FAILOVER_ON, Router

__all__ = [
    "DEFAULT_FAILOVER_ON",
    "BatchResults",
    "BreakerConfig",
    "BreakerState",
    "Candidate",
    "CircuitBreaker",
    "EventKind",
    "Failover",
    "Hedge",
    "LoggingHook",
    "Overflow",
    "Priors",
    "RetryBudget",
    "RetryBudgetConfig",
    "Route",
    "Router",
    "RouterEvent",
    "RouterHook",
    "RoutingPolicy",
    "RunnerStats",
    "run_batch",
]
