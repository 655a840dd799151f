"""Storage pull benchmark: the job's parallel pull against a one-by-one download loop.

Uploads N small real images from ../shared/data/chest_xray_pneumonia_224 (or --data) to a GCS emulator on
loopback (devkit/gcs_emulator.py), then pulls the prefix into fresh cache directories, alternating
storage.pull_tree (listing + transfer_manager threads) with a loop of blob.download_to_filename,
and prints one JSON object: objects/s of each (median over the repeats) and their ratio.

--latency-ms delays every emulator response to stand in for the round trip to a real bucket;
with 0 the numbers measure per-request CPU cost on this machine only.

    python -m bench.storage_pull [--objects 2000] [--repeats 3] [--latency-ms 0] [--max-workers 8]
        [--data DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "chest_xray_pneumonia_224"

from google.cloud import storage as gcs  # noqa: E402
from google.cloud.storage import transfer_manager  # noqa: E402

import storage
from devkit import gcs_emulator

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
BUCKET = "bench"
PREFIX = "chest_xray"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--max-workers", type=int, default=storage.DEFAULT_MAX_WORKERS)
    parser.add_argument("--data", type=Path, default=DATA, help="a folder of images, nested or not")
    args = parser.parse_args(argv)
    source = args.data.resolve()
    images = sorted(path for path in source.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    images = images[:args.objects]
    if len(images) < args.objects:
        sys.exit(f"{source}: found {len(images)} images, need {args.objects}")

    with gcs_emulator.running(latency_ms=args.latency_ms) as url, tempfile.TemporaryDirectory() as tmp:
        os.environ["STORAGE_EMULATOR_HOST"] = url
        client = gcs.Client(project="bench")
        upload(client, source, images)
        uri = f"gs://{BUCKET}/{PREFIX}"
        parallel, sequential = [], []
        for repeat in range(args.repeats):
            stats = storage.pull_tree(uri, Path(tmp, f"parallel-{repeat}"), max_workers=args.max_workers)
            parallel.append(stats.objects / stats.seconds)
            sequential.append(pull_one_by_one(client, Path(tmp, f"sequential-{repeat}")))
    result = {
        "objects": len(images),
        "bytes": sum(path.stat().st_size for path in images),
        "repeats": args.repeats,
        "latency_ms": args.latency_ms,
        "max_workers": args.max_workers,
        "cpu_count": os.cpu_count(),
        "parallel_objects_per_s": round(statistics.median(parallel), 1),
        "sequential_objects_per_s": round(statistics.median(sequential), 1),
        "speedup": round(statistics.median(parallel) / statistics.median(sequential), 2),
    }
    print(json.dumps(result))


def upload(client: gcs.Client, source: Path, images: list[Path]) -> None:
    bucket = client.create_bucket(BUCKET)
    transfer_manager.upload_many(
        [(str(path), bucket.blob(f"{PREFIX}/{path.relative_to(source).as_posix()}")) for path in images],
        worker_type=transfer_manager.THREAD, raise_exception=True)


def pull_one_by_one(client: gcs.Client, local_dir: Path) -> float:
    """Objects/s of the naive pull: list, then download each object in turn."""
    start = time.monotonic()
    count = 0
    for blob in client.list_blobs(BUCKET, prefix=f"{PREFIX}/"):
        target = local_dir / blob.name[len(PREFIX) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target))
        count += 1
    return count / (time.monotonic() - start)


if __name__ == "__main__":
    main()
