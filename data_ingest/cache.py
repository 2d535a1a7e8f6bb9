"""An Arrow cache of token records, so repeated epochs read tokens instead of re-reading and re-tokenizing X.

Tokenization is a pure function of a cell (its counts, batch, label) and the tokenizer settings: every random
choice is hashed from `(seed, cell_id, gene)` (see `data_ingest.tokenize`). So records can be stored per cell
and served to any epoch's shuffled read tasks unchanged.

Layout: `<dir>/<key>/` is one cache entry; `key` hashes everything the records depend on (`cache_key`): the
experiment URI (a pinned census release has its own URI), measurement and layer, the vocabulary mapping of
the experiment's genes, `<cls>`, the batch / label columns and categories (these come from the obs filter),
the tokenizer config and the shard layout. Change any of them and the entry is a different directory; old
entries are never read again (delete them by hand to reclaim disk). `key.json` records the key's inputs.

Inside an entry, `shard_<k>.arrow` (an Arrow IPC file) holds the records of every cell with soma_joinid in
`[k * shard_cells, (k + 1) * shard_cells)` (all cells, not only the selected ones, so a shard serves any
selection with the same categories), sorted by cell_id, with the stream's compact token types, in record
batches of `record_batch_cells`; the file's schema metadata lists each batch's first cell_id, so a read
task opens the file memory-mapped and decodes only the batches holding its cells (with `compression:
none` it decodes nothing: the records are used where they lie). A shard is built the first time a read task
needs one of its cells (contiguous X rows, the cheapest read), written under a temporary name and renamed,
so a reader never sees half a shard and two tasks building the same shard at once are harmless.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_ingest import keys
from data_ingest.atomic import write_text_atomic
from data_ingest.datasource import read_token_table, record_schema
from data_ingest.source import ResolvedSource, open_experiment
from data_ingest.tokenize import TokenizerConfig

CACHE_FORMAT = 2
"""Bump when the shard layout or record schema changes: old entries then get a different key (format 1 was
Parquet shards)."""
KEY_FILE = "key.json"
COMPRESSIONS = ("lz4", "zstd", "none")
_FIRST_IDS = b"scgpt.batch_first_cell_ids"
"""Shard schema metadata: the first cell_id of each record batch (int64 bytes)."""


@dataclass
class TokenCacheConfig:
    """Where and how token records are cached (off unless `dir` is set)."""

    dir: str | None = None
    """Cache root directory; None disables the cache. Entries live in `<dir>/<key>/`."""
    shard_cells: int = 2048
    """Consecutive soma_joinids per shard file (built as one contiguous X read, one row of X's tiles)."""
    record_batch_cells: int = 256
    """Records per Arrow record batch: the unit a read task decodes (with compression). A stream chunk of
    256 cells is one batch, the default 512 two; a smaller chunk decodes whole batches to use part of them."""
    compression: str = "lz4"
    """Compression of the shard files' record batches: `lz4` (LZ4 frame), `zstd` or `none` (uncompressed:
    read in place from the memory-mapped file; about 3 bytes per token on disk)."""

    def __post_init__(self) -> None:
        if self.shard_cells < 1 or self.record_batch_cells < 1:
            raise ValueError(
                f"token cache shard_cells={self.shard_cells}, record_batch_cells="
                f"{self.record_batch_cells}: both must be >= 1"
            )
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"token cache compression={self.compression!r}; use one of {', '.join(COMPRESSIONS)}"
            )


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def cache_key(
    src: ResolvedSource, tok: TokenizerConfig, cls_id: int, cfg: TokenCacheConfig
) -> tuple[str, dict]:
    """(key, the inputs it hashes) of the cache entry for these records."""
    material = {
        "format": CACHE_FORMAT,
        "soma_uri": str(src.soma_uri),
        "measurement": src.measurement,
        "layer": src.layer,
        "vocab_sha256": _sha256(np.asarray(src.feature_tokens, np.int64)),
        "cls_id": int(cls_id),
        "batch_key": src.batch_key,
        "batch_categories": list(src.batch_categories),
        "label_key": src.label_key,
        "label_categories": list(src.label_categories),
        "tokenizer": dataclasses.asdict(tok),
        "shard_cells": cfg.shard_cells,
        "record_batch_cells": cfg.record_batch_cells,
    }
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20], material


@dataclass
class CacheEntry:
    """One cache entry: a directory of shard files (cheap to ship to read tasks)."""

    path: str
    cfg: TokenCacheConfig

    @classmethod
    def open(
        cls, src: ResolvedSource, tok: TokenizerConfig, cls_id: int, cfg: TokenCacheConfig
    ) -> CacheEntry:
        """The entry for these records, created (with its `key.json`) if new."""
        if cfg.dir is None:
            raise ValueError("the token cache is off (dir is None); set stream.token_cache.dir")
        key, material = cache_key(src, tok, cls_id, cfg)
        path = Path(cfg.dir) / key
        if not (path / KEY_FILE).exists():
            path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path / KEY_FILE, json.dumps(material, indent=1, sort_keys=True))
        return cls(str(path), cfg)

    def shard_path(self, shard: int) -> Path:
        return Path(self.path) / f"shard_{shard:08d}.arrow"

    def shards(self) -> list[int]:
        """Shards written so far."""
        return sorted(int(p.stem.split("_")[1]) for p in Path(self.path).glob("shard_*.arrow"))

    def read(
        self,
        src: ResolvedSource,
        joinids: np.ndarray,
        tok: TokenizerConfig,
        cls_id: int,
        readers: int = 1,
    ) -> pa.Table:
        """Token records of the cells `joinids` (sorted), in that order, skipped cells absent: the table
        `read_token_table(..., compact=True)` returns. Builds the shards it needs that are missing. Shards
        are read (and built) `readers` at once on threads: decompression, X reads and tokenizing release
        the GIL."""
        joinids = np.asarray(joinids, np.int64)
        shard_of = joinids // self.cfg.shard_cells
        shards, first = np.unique(shard_of, return_index=True)
        bounds = [*first.tolist(), len(joinids)]

        def part(i: int) -> pa.Table:
            path = self.shard_path(int(shards[i]))
            if not path.exists():
                self._build(src, int(shards[i]), tok, cls_id)
            return self._read_rows(path, joinids[bounds[i] : bounds[i + 1]])

        schema = record_schema(src, tok, cls_id)
        with ThreadPoolExecutor(max(1, readers), thread_name_prefix="token-cache") as pool:
            parts = [p for p in pool.map(part, range(len(shards))) if p.num_rows]
        if not parts:
            return schema.empty_table()
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    @staticmethod
    def _read_rows(path: Path, ids: np.ndarray) -> pa.Table:
        """The records of the cells `ids` (sorted) stored in shard file `path`."""
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        first = np.frombuffer(reader.schema.metadata[_FIRST_IDS], np.int64)
        schema = reader.schema.remove_metadata()
        if not len(first):
            return schema.empty_table()
        batch_of = np.searchsorted(first, ids, "right") - 1
        parts = []
        for b in np.unique(batch_of[batch_of >= 0]).tolist():
            batch = reader.get_batch(b)
            stored = batch.column(keys.CELL_ID).to_numpy()
            want = ids[batch_of == b]
            rows = np.searchsorted(stored, want)
            rows = rows[(rows < len(stored)) & (stored[np.minimum(rows, len(stored) - 1)] == want)]
            if len(rows) == len(stored):
                parts.append(batch)
            elif len(rows):
                parts.append(batch.take(pa.array(rows)))
        return pa.Table.from_batches(parts, schema=schema)

    def _build(self, src: ResolvedSource, shard: int, tok: TokenizerConfig, cls_id: int) -> None:
        lo = shard * self.cfg.shard_cells
        hi = lo + self.cfg.shard_cells - 1
        with open_experiment(src.soma_uri, src.tiledb_config) as exp:
            present = (
                exp.obs.read(coords=(slice(lo, hi),), column_names=[keys.SOMA_JOINID])
                .concat()
                .column(0)
                .to_numpy()
            )
        table = read_token_table(src, np.sort(present), tok, cls_id, compact=True)
        table = table.take(pc.sort_indices(table, [(keys.CELL_ID, "ascending")])).combine_chunks()
        batches = table.to_batches(max_chunksize=self.cfg.record_batch_cells)
        first = np.array(
            [b.column(keys.CELL_ID)[0].as_py() for b in batches if b.num_rows], np.int64
        )
        schema = table.schema.with_metadata({_FIRST_IDS: first.tobytes()})
        codec = None if self.cfg.compression == "none" else self.cfg.compression
        path = self.shard_path(shard)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{uuid.uuid4().hex[:6]}.")
        os.close(fd)
        try:
            options = pa.ipc.IpcWriteOptions(compression=codec)
            with pa.ipc.new_file(tmp, schema, options=options) as writer:
                for batch in batches:
                    if batch.num_rows:
                        writer.write_batch(batch)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
