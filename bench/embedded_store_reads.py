"""Reading the points of many objects from an embedded store: one pass picked out with a set (what the
writer does there) vs a filtered scroll per chunk of 256 URIs (what it does on a server).

    .venv/bin/python bench/embedded_store_reads.py [--points 20000] [--uris 2000]

These reads are a run's bookkeeping: a stopped run's accounting (stored_objects over the run's URIs,
which must fit in `ray job stop`'s grace before SIGKILL), replaced units (delete_stale) and settled
unit counts. Both ways run on the same store, alternately; prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

import _common as C  # noqa: F401  (sets sys.path)


def main() -> None:
    """Build the store, time both ways side by side, print a table."""
    from qdrant_client import QdrantClient, models

    from sinks.qdrant_client_factory import tune_embedded_storage
    from sinks.qdrant_writer import PointRecord, QdrantWriter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--uris", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="qvl-bench-store-"))
    client = QdrantClient(path=str(root))
    try:
        client.create_collection("c", vectors_config={"full": models.VectorParams(size=64, distance=models.Distance.COSINE)})
        tune_embedded_storage(client)
        writer = QdrantWriter(client, "c", max_points_per_request=1024)
        rng = np.random.default_rng(0)
        uris = [f"/data/doc{i:06d}.txt" for i in range(args.points)]
        for i in range(0, args.points, 2048):
            writer.upsert_points([PointRecord(str(uuid.uuid5(uuid.NAMESPACE_URL, u)), {"full": rng.random(64, np.float32)},
                                              {"source_uri": u, "fingerprint": "fp", "object_units": 1, "modality": "text"})
                                  for u in uris[i:i + 2048]])
        asked = uris[:: max(1, args.points // args.uris)][: args.uris]
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for one_pass in (True, False):  # interleaved: noise falls on both
                writer.one_pass = one_pass
                seconds, held = C.timed(lambda: writer.stored_objects(asked))
                assert len(held) == len(asked)
                times[one_pass].append(seconds)
        one, chunks = C.median(times[True]), C.median(times[False])
        print(f"# {C.machine()}")
        C.print_table(f"stored_objects over {len(asked):,} URIs of {args.points:,} points, embedded store "
                      f"(median of {args.repeats})", ["way", "seconds"],
                      [["one pass, picked with a set (embedded default)", one],
                       ["a filtered scroll per 256 URIs (the server way)", chunks],
                       ["ratio, filtered / one pass", chunks / one]])
    finally:
        client.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
