"""The emulated Vast marketplace: offers, and the query language the SDK sends to search them.

A search body is the SDK's parsed query (``vastai/api/query.py``: ``{"field": {"op": value}}``
with ops ``eq neq gt gte lt lte in notin``; values may be strings, as the SDK parses
``dph<=0.6`` into ``{"dph_total": {"lte": "0.6"}}``) plus ``order`` (``[[field, "asc"|"desc"]]``),
``type``, ``limit`` and ``allocated_storage`` (GB, priced into each offer's ``dph_total``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = ["HOURS_PER_MONTH", "default_offers", "matches", "search"]

HOURS_PER_MONTH: Final = 30 * 24  # storage_cost is USD per GB per month
# Keys of a search body that shape the answer rather than filter offers.
_SEARCH_OPTIONS: Final = frozenset(
    {"order", "type", "limit", "allocated_storage", "disable_bundling", "extra_ids"}
)


def default_offers() -> list[dict[str, Any]]:
    """Three RTX 4090 offers at 0.35, 0.45 and 0.70 $/h (GPU), 0.15 $/GB/month of disk."""
    return [
        _offer(1001, dph_base=0.35, reliability=0.995),
        _offer(1002, dph_base=0.45, reliability=0.999),
        _offer(1003, dph_base=0.70, reliability=0.999),
    ]


def _offer(offer_id: int, *, dph_base: float, reliability: float) -> dict[str, Any]:
    return {
        "id": offer_id, "ask_contract_id": offer_id, "machine_id": offer_id + 5000,
        "host_id": 77, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564,
        "reliability": reliability, "reliability2": reliability, "dph_base": dph_base,
        "storage_cost": 0.15, "direct_port_count": 100, "disk_space": 500.0,
        "inet_up": 900.0, "inet_down": 900.0, "cuda_max_good": 12.8, "verified": True,
        "rentable": True, "rented": False, "external": False, "hosting_type": 0,
        "geolocation": "Iceland, IS",
    }  # fmt: skip


def search(
    offers: Sequence[Mapping[str, Any]], q: Mapping[str, Any], *, honour_price_filter: bool
) -> list[dict[str, Any]]:
    """The offers matching search body ``q``, priced for its storage, sorted, limited."""
    storage_gb = float(q.get("allocated_storage", 5.0))
    found: list[dict[str, Any]] = []
    for raw in offers:
        offer = dict(raw)
        storage = float(offer.get("storage_cost", 0.0)) * storage_gb / HOURS_PER_MONTH
        offer["storage_total_cost"] = storage
        offer["dph_total"] = float(offer.get("dph_base", 0.0)) + storage
        filters = {
            k: v
            for k, v in q.items()
            if k not in _SEARCH_OPTIONS
            and isinstance(v, Mapping)
            and (honour_price_filter or k != "dph_total")
        }
        if all(matches(offer.get(k), ops) for k, ops in filters.items()):
            found.append(offer)
    for column, direction in reversed(q.get("order") or []):
        found.sort(key=functools.partial(_sort_key, column), reverse=direction == "desc")
    limit = q.get("limit")
    return found[: int(limit)] if limit else found


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def matches(value: Any, ops: Any) -> bool:
    """Whether ``value`` passes a query clause like ``{"gte": "0.98"}`` (missing fields pass)."""
    if value is None or not isinstance(ops, Mapping):
        return True
    for op, wanted in ops.items():
        if op in {"in", "notin"}:
            inside = value in wanted or str(value) in map(str, wanted)
            if inside != (op == "in"):
                return False
            continue
        a, b = _number(value), _number(wanted)
        if op in {"eq", "neq"}:
            same = a == b if a is not None and b is not None else value == wanted
            if same != (op == "eq"):
                return False
        elif a is None or b is None or not _compare(op, a, b):
            return False
    return True


def _compare(op: str, a: float, b: float) -> bool:
    return {"gt": a > b, "gte": a >= b, "lt": a < b, "lte": a <= b}.get(op, True)


def _sort_key(column: str, offer: Mapping[str, Any]) -> tuple[int, float, str]:
    value = offer.get(column)
    number = _number(value)
    return (0, number, "") if number is not None else (1, 0.0, str(value))
