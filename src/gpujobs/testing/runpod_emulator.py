"""Run the RunPod Serverless emulator in the foreground, for benchmarks and manual tests.

Example::

    python -m gpujobs.testing.runpod_emulator --port 8000 --workers 4 --cold-start-s 0

Once listening it writes the endpoint's base URL (``http://127.0.0.1:8000/v2/test-endpoint``)
as one line to stdout, so a parent process can wait for it; SIGINT or SIGTERM stop it.
``--handler`` takes ``scripted``, ``stream`` or ``package.module:function``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gpujobs.testing._emulator_server import Faults, serve
from gpujobs.testing._runpod_emulator import DEFAULT_RATE_LIMITS, RunPodEmulator
from gpujobs.testing.handlers import scripted_handler, scripted_stream_handler

__all__ = ["main"]

_HANDLERS: dict[str, Callable[..., Any]] = {
    "scripted": scripted_handler,
    "stream": scripted_stream_handler,
}


def _handler(name: str) -> Callable[..., Any]:
    if name in _HANDLERS:
        return _HANDLERS[name]
    module_name, _, attribute = name.partition(":")
    if not attribute:
        message = f"handler {name!r}: use scripted, stream or module:function"
        raise argparse.ArgumentTypeError(message)
    handler: Callable[..., Any] = getattr(importlib.import_module(module_name), attribute)
    return handler


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gpujobs.testing.runpod_emulator",
        description="Serve a RunPod Serverless API emulator on loopback.",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    add("--endpoint-id", default="test-endpoint", help="the {endpoint_id} in /v2/{endpoint_id}")
    add("--workers", type=int, default=2, help="jobs run at once (default: %(default)s)")
    add("--cold-start-s", type=float, default=0.0, help="cold worker start-up time")
    add("--idle-timeout-s", type=float, default=5.0, help="idle time after which a worker is cold")
    add("--handler", type=_handler, default=scripted_handler,
        help="scripted (default), stream, or module:function")  # fmt: skip
    add("--api-key", default=None, help="require this key in Authorization headers")
    add("--seed", type=int, default=None, help="seed for random faults")
    add("--rate-limit", type=float, default=0.0, help="chance of a 429 per request")
    add("--server-error", type=float, default=0.0, help="chance of a 5xx per request")
    add("--drop-connection", type=float, default=0.0, help="chance of a cut response")
    add("--no-rate-limits", action="store_true", help="lift RunPod's per-route rate limits")
    add("--log-level", default="WARNING", help="logging level (default: %(default)s)")
    return parser


async def _serve(emulator: RunPodEmulator, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(signum, stop.set)
    async with serve(emulator, host=host, port=port) as server:
        sys.stdout.write(server.url + "\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` and serve until interrupted."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    faults = Faults(
        seed=args.seed,
        rate_limit=args.rate_limit,
        server_error=args.server_error,
        drop_connection=args.drop_connection,
    )
    no_limits: dict[str, int | None] = dict.fromkeys(DEFAULT_RATE_LIMITS)
    emulator = RunPodEmulator(
        args.handler,
        endpoint_id=args.endpoint_id,
        workers=args.workers,
        cold_start_s=args.cold_start_s,
        idle_timeout_s=args.idle_timeout_s,
        api_key=args.api_key,
        faults=faults,
        rate_limits=no_limits if args.no_rate_limits else None,
    )
    asyncio.run(_serve(emulator, args.host, args.port))


if __name__ == "__main__":
    main()
