"""Count a ddsnap store's B-tree blocks and exceptions, read-only, for the benchmark's
"metadata bytes per exception" (issue 9).  Run by the benchmark (ddsnap_bench/peers.py)
with the venv's Python (so that `--rev` is honoured through PYTHONPATH) on a store no
server holds:

    python bench/metaprobe.py STORE

prints one JSON object: index levels, leaves, index nodes, leaf records, exceptions
(``exception_chunks()``), the origin's history entries, snapshot table blocks and the
records a full leaf holds.  Nothing is written to the store (``mode="inspect"``).
"""

from __future__ import annotations

import json
import sys

from ddsnap.store.blockdev import FileDevice
from ddsnap.store.format import LEAF_MAX, ORIGIN
from ddsnap.store.shared import SharedStore


def probe(path: str) -> dict:
    dev = FileDevice(path, writable=False)
    try:
        store = SharedStore.open(dev, mode="inspect")
        # The store's private B-tree readers: there is no public iterator yet (issue 10,
        # item 3), and with `bench/run --rev` this runs under older revisions' code.
        levels = store.state.levels
        index_nodes = 0

        def walk(block: int, level: int) -> None:
            nonlocal index_nodes
            index_nodes += 1
            if level < levels - 1:
                for child in store._read_node(block).children:  # noqa: SLF001
                    walk(child, level + 1)

        walk(store.state.root, 0)
        leaves = records = origin = 0
        for _block, leaf in store._leaves():  # noqa: SLF001
            leaves += 1
            records += len(leaf.keys)
            origin += sum(1 for k in leaf.keys if k >> 96 == ORIGIN)
        return {"levels": levels, "leaves": leaves, "index_nodes": index_nodes,
                "records": records, "exceptions": store.exception_chunks(),
                "origin_entries": origin, "table_blocks": len(store.table_blocks),
                "leaf_max": LEAF_MAX, "chunk_size": store.chunk_size,
                "snapshots": len(store.snapshots())}
    finally:
        dev.close()


if __name__ == "__main__":
    json.dump(probe(sys.argv[1]), sys.stdout)
    print()
