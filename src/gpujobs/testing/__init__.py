"""Test doubles for gpujobs: provider emulators served on loopback, and scripted handlers.

The RunPod Serverless emulator speaks RunPod's HTTP API over real sockets, with cold starts,
rate limits and fault injection, so clients are tested (and benchmarked) as they run in
production. Serving it needs the ``testing`` extra (uvicorn)::

    from gpujobs.testing import RunPodEmulator, serve

    emulator = RunPodEmulator(workers=2, cold_start_s=0.05)
    async with serve(emulator) as server:
        emulator.inject("run", "server_error")
        ...  # point a client at server.url

From a shell: ``python -m gpujobs.testing.runpod_emulator --port 8000``.

``VastEmulator`` serves the Vast.ai console API the ``vastai`` SDK calls, with rented instances
that each run a real worker on loopback, and faults (creates that rent then time out, instances
that die, ports that appear late).
"""

from gpujobs.testing._emulator_server import (
    EmulatorServer,
    EmulatorStats,
    Faults,
    serve,
    serve_in_thread,
)
from gpujobs.testing._handler_worker import HandlerWorker
from gpujobs.testing._local_servers import free_port, runpod_local_server, serve_app_in_thread
from gpujobs.testing._modal_fake import FakeModal, ModalWebEmulator
from gpujobs.testing._proxy import CuttingProxy
from gpujobs.testing._runpod_emulator import DEFAULT_RATE_LIMITS, RunPodEmulator
from gpujobs.testing._runpod_pods_emulator import RunPodPodsEmulator
from gpujobs.testing._simulated_serverless import SimulatedServerless
from gpujobs.testing._simulation import SimulatedPod
from gpujobs.testing._traffic import JobRecord, TraceJob, bursty_trace, replay
from gpujobs.testing._vast_emulator import VastEmulator
from gpujobs.testing._virtual_clock import VirtualClockLoop, run_virtual
from gpujobs.testing.handlers import scripted_handler, scripted_stream_handler

__all__ = [
    "DEFAULT_RATE_LIMITS",
    "CuttingProxy",
    "EmulatorServer",
    "EmulatorStats",
    "FakeModal",
    "Faults",
    "HandlerWorker",
    "JobRecord",
    "ModalWebEmulator",
    "RunPodEmulator",
    "RunPodPodsEmulator",
    "SimulatedPod",
    "SimulatedServerless",
    "TraceJob",
    "VastEmulator",
    "VirtualClockLoop",
    "bursty_trace",
    "free_port",
    "replay",
    "run_virtual",
    "runpod_local_server",
    "scripted_handler",
    "scripted_stream_handler",
    "serve",
    "serve_app_in_thread",
    "serve_in_thread",
]
