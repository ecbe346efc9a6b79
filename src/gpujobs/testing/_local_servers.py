"""Real servers on loopback for tests: a runpod SDK worker's local test API, any ASGI app.

Both wait (bounded) until the server accepts connections and stop it on the way out.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

__all__ = ["free_port", "runpod_local_server", "serve_app_in_thread"]

_POLL_S = 0.02


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def runpod_local_server(
    command: Sequence[str], *, env: Mapping[str, str] | None = None, within_s: float = 60.0
) -> Iterator[str]:
    """Run a runpod SDK worker with its local test API (``--rp_serve_api``); yield its URL.

    ``command`` starts the worker, e.g. ``[sys.executable, "handler.py"]``; this adds the flags
    that serve runpod's own test API on a free port of 127.0.0.1. The URL is ready once the port
    accepts connections (a worker that loads a model first opens it after loading).

    Raises:
        RuntimeError: the worker exited, or did not listen within ``within_s``; the message holds
            the end of what it wrote to stderr.
    """
    port = free_port()
    argv = [*command, "--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"]
    # stderr goes to a file: a pipe nobody reads blocks a chatty worker once it fills.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(  # noqa: S603 - the caller's own worker
            argv,
            env=dict(env) if env is not None else None,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )

        def failure(why: str) -> RuntimeError:
            stderr.seek(0)
            return RuntimeError(f"{why}:\n{stderr.read().decode(errors='replace')[-3000:]}")

        try:
            deadline = time.monotonic() + within_s
            while not _accepts(port):
                if process.poll() is not None:
                    raise failure(f"the worker exited with {process.returncode}")
                if time.monotonic() > deadline:
                    raise failure(f"the worker did not listen within {within_s} s")
                time.sleep(_POLL_S)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def serve_app_in_thread(
    app: Any, *, lifespan: Literal["auto", "on", "off"] = "on", within_s: float = 10.0
) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port, from a thread; yield its URL.

    For apps with a lifespan of their own (the worker's pod server); emulators have
    :func:`serve_in_thread`, which also exposes their controls.
    """
    import uvicorn  # noqa: PLC0415 - the testing extra, only when serving

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name="gpujobs-asgi", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + within_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {within_s} s")
            time.sleep(0.005)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        listener.close()
