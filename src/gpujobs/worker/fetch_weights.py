"""Download the Qwen-Image-Layered weights once, into the folder the worker reads (``MODEL_PATH``).

This is the only code in gpujobs that downloads anything. An operator runs it once to fill a
network volume or a Docker build stage::

    python -m gpujobs.worker.fetch_weights /runpod-volume/qwen-image-layered --revision <commit>

Pin ``--revision`` to a commit for reproducible workers. The folder is then checked with
:func:`~gpujobs.worker.pipeline.check_weights` and a small ``gpujobs-weights.json`` records the
repository, the revision asked for and the commit received, which the worker reports as
``PipelineInfo.revision``. ``HF_TOKEN`` and the other ``HF_*`` variables work as usual.

Only huggingface_hub is needed (no torch): a download-only build stage stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from gpujobs.worker.pipeline import MODEL_ID, WEIGHTS_MARKER, WeightsMissingError, check_weights

__all__ = ["ALLOW_PATTERNS", "fetch_weights", "main"]

ALLOW_PATTERNS = (
    "model_index.json",
    "scheduler/*",
    "text_encoder/*",
    "tokenizer/*",
    "processor/*",
    "transformer/*",
    "vae/*",
)
"""What the pipeline loads; README images and other extras in the repository are skipped."""

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def fetch_weights(
    dest: str | os.PathLike[str],
    *,
    revision: str | None = None,
    repo_id: str = MODEL_ID,
    max_workers: int = 8,
) -> Path:
    """Download the pipeline into ``dest`` and check that it is complete.

    Files already in ``dest`` are kept when unchanged, so an interrupted run can be started
    again.

    Args:
        dest: the folder to fill (created if needed); the worker's ``MODEL_PATH``.
        revision: branch, tag or commit; ``None`` means the repository's default branch.
        repo_id: the Hub repository.
        max_workers: parallel file downloads.

    Returns:
        ``dest`` as an absolute :class:`~pathlib.Path`.

    Raises:
        WeightsMissingError: the download finished but the folder is still incomplete.
    """
    from huggingface_hub import snapshot_download  # noqa: PLC0415  # only this command needs it

    target = Path(dest).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    snapshot_download(
        repo_id=repo_id,
        revision=revision,
        local_dir=target,
        allow_patterns=list(ALLOW_PATTERNS),
        max_workers=max_workers,
    )
    check_weights(target)
    marker = {
        "repo_id": repo_id,
        "revision": revision,
        "commit": _downloaded_commit(target),
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (target / WEIGHTS_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m gpujobs.worker.fetch_weights DEST [--revision R]``."""
    parser = argparse.ArgumentParser(
        prog="python -m gpujobs.worker.fetch_weights",
        description=f"Download {MODEL_ID} into the folder the worker reads (MODEL_PATH).",
    )
    parser.add_argument("dest", type=Path, help="folder to fill, e.g. a network volume path")
    parser.add_argument(
        "--revision", default=None, help="branch, tag or commit to fetch (pin a commit)"
    )
    parser.add_argument("--repo-id", default=MODEL_ID, help=f"Hub repository (default {MODEL_ID})")
    parser.add_argument("--max-workers", type=int, default=8, help="parallel downloads")
    args = parser.parse_args(argv)
    try:
        target = fetch_weights(
            args.dest, revision=args.revision, repo_id=args.repo_id, max_workers=args.max_workers
        )
    except WeightsMissingError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(f"{args.repo_id} is in {target}; start the worker with MODEL_PATH={target}\n")
    return 0


def _downloaded_commit(target: Path) -> str | None:
    """The commit huggingface_hub recorded for ``model_index.json``, if it kept one.

    ``snapshot_download(local_dir=...)`` keeps ``.cache/huggingface/download/<file>.metadata``,
    whose first line is the commit. That layout belongs to huggingface_hub, not to a promise:
    anything unexpected gives ``None`` rather than an error.
    """
    metadata = target / ".cache" / "huggingface" / "download" / "model_index.json.metadata"
    try:
        first = metadata.read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    return first if _COMMIT.match(first) else None


if __name__ == "__main__":
    raise SystemExit(main())
