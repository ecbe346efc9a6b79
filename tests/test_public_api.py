"""The public surface is a contract: names pinned, each documented, import kept light."""

from __future__ import annotations

import inspect
import subprocess
import sys

import gpujobs

EXPECTED = {
    "AuthenticationError",
    "BaseRunner",
    "CapacityError",
    "ConfigurationError",
    "Cost",
    "GpuJobsError",
    "Handler",
    "Health",
    "InvalidInputError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobHandle",
    "JobLostError",
    "JobResult",
    "JobRunner",
    "JobState",
    "JobStatus",
    "JobTimeoutError",
    "JobTimings",
    "LocalRunner",
    "MachineRunner",
    "ModalRunner",
    "PollSchedule",
    "ProviderError",
    "ProviderUnavailableError",
    "RateLimitedError",
    "RetryPolicy",
    "Router",
    "RunPodPod",
    "RunPodServerless",
    "SyncRunner",
    "VastRunner",
    "__version__",
}


def test_public_names_are_pinned() -> None:
    assert set(gpujobs.__all__) == EXPECTED
    for name in gpujobs.__all__:
        assert hasattr(gpujobs, name), name


def test_every_public_class_and_method_is_documented() -> None:
    for name in gpujobs.__all__:
        obj = getattr(gpujobs, name)
        if not inspect.isclass(obj):
            continue
        assert inspect.getdoc(obj), f"{name} has no docstring"
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not callable(member):
                continue
            assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


def test_runners_satisfy_the_protocol() -> None:
    async def handler(job: dict[str, object]) -> object:
        return job

    local = gpujobs.LocalRunner(handler)
    remote = gpujobs.RunPodServerless(endpoint_url="http://127.0.0.1:9", api_key="k")
    assert isinstance(local, gpujobs.JobRunner)
    assert isinstance(remote, gpujobs.JobRunner)


def test_import_is_light_and_reads_no_environment() -> None:
    probe = """
import os, sys
read = []
class Watched(dict):
    def _note(self, key):
        caller = sys._getframe(2).f_globals.get("__name__", "")
        if caller.startswith("gpujobs"):
            read.append((caller, key))
    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)
    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)
os.environ = Watched(os.environ)
import gpujobs
assert not read, read
heavy = {"runpod", "modal", "vastai", "torch", "diffusers", "starlette", "uvicorn", "aiohttp"}
# httpx (with rich, pygments and click where installed) and tenacity load on first need.
heavy |= {"httpx", "tenacity", "rich", "pygments", "click"}
loaded = sorted(heavy & {m.split(".")[0] for m in sys.modules})
assert not loaded, loaded
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"
