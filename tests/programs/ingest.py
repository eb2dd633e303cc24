"""Ingest a catalog in this process (for a test to kill it mid-ingest):
python -m tests.programs.ingest STORE SOURCE PRICES NAME SHARD_ROWS WORKERS"""

import json
import sys

from tasks.data.catalog import ingest_catalog
from tasks.store.lake import Lake
from tasks.store.storage import open_store

if __name__ == "__main__":
    store, source, prices, name, rows, workers = sys.argv[1:7]
    out = ingest_catalog(Lake(open_store(store)), source, prices, name, shard_rows=int(rows),
                         workers=int(workers))  # fmt: skip
    print(json.dumps({k: out[k] for k in ("dataset_version", "decoded", "reused")}))
