"""A Parquet cache of token records, so repeated epochs read tokens instead of re-reading and re-tokenizing X.

Tokenization is a pure function of a cell (its counts, batch, label) and the tokenizer settings: every random
choice is hashed from `(seed, cell_id, gene)` (see `data_ingest.tokenize`). So records can be stored per cell
and served to any epoch's shuffled read tasks unchanged.

Layout: `<dir>/<key>/` is one cache entry; `key` hashes everything the records depend on (`cache_key`): the
experiment URI (a pinned census release has its own URI), measurement and layer, the vocabulary mapping of
the experiment's genes, `<cls>`, the batch / label columns and categories (these come from the obs filter),
the tokenizer config and the shard size. Change any of them and the entry is a different directory; old
entries are never read again (delete them by hand to reclaim disk). `key.json` records the key's inputs.

Inside an entry, `shard_<k>.parquet` holds the records of every cell with soma_joinid in
`[k * shard_cells, (k + 1) * shard_cells)` (all cells, not only the selected ones, so a shard serves any
selection with the same categories), sorted by cell_id, in row groups of `row_group_cells` so a read task
decodes only the row groups holding its cells. A shard is built the first time a read task needs one of its
cells (contiguous X rows, the cheapest read), written under a temporary name and renamed, so a reader never
sees half a shard and two tasks building the same shard at once are harmless.
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
import pyarrow.parquet as pq

from data_ingest import keys
from data_ingest.atomic import write_text_atomic
from data_ingest.source import ResolvedSource
from data_ingest.tokenize import RECORD_SCHEMA, TokenizerConfig

CACHE_FORMAT = 1
"""Bump when the shard layout or record schema changes: old entries then get a different key."""
KEY_FILE = "key.json"


@dataclass
class TokenCacheConfig:
    """Where and how token records are cached (off unless `dir` is set)."""

    dir: str | None = None
    """Cache root directory; None disables the cache. Entries live in `<dir>/<key>/`."""
    shard_cells: int = 2048
    """Consecutive soma_joinids per shard file (built as one contiguous X read, one row of X's tiles)."""
    row_group_cells: int = 256
    """Records per Parquet row group: the unit a read task decodes. With the stream's default `chunk_size`
    (256) a chunk is one row group; a smaller chunk decodes whole row groups to use part of them."""
    compression: str = "lz4"
    """Parquet compression codec of the shard files (`none`, `lz4`, `zstd`, ...)."""

    def __post_init__(self) -> None:
        if self.shard_cells < 1 or self.row_group_cells < 1:
            raise ValueError(
                f"token cache shard_cells={self.shard_cells}, row_group_cells={self.row_group_cells}: "
                "both must be >= 1"
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
        "row_group_cells": cfg.row_group_cells,
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
        return Path(self.path) / f"shard_{shard:08d}.parquet"

    def shards(self) -> list[int]:
        """Shards written so far."""
        return sorted(int(p.stem.split("_")[1]) for p in Path(self.path).glob("shard_*.parquet"))

    def read(
        self,
        src: ResolvedSource,
        joinids: np.ndarray,
        tok: TokenizerConfig,
        cls_id: int,
        readers: int = 1,
    ):
        """Token records of the cells `joinids` (sorted), in that order, skipped cells absent: the same
        table `read_token_table` returns. Builds the shards it needs that are missing. Shards are read (and
        built) `readers` at once on threads: Parquet decoding, X reads and tokenizing release the GIL."""
        joinids = np.asarray(joinids, np.int64)
        shard_of = joinids // self.cfg.shard_cells

        def part(shard: int) -> pa.Table:
            path = self.shard_path(shard)
            if not path.exists():
                self._build(src, shard, tok, cls_id)
            return self._read_rows(path, joinids[shard_of == shard])

        with ThreadPoolExecutor(max(1, readers), thread_name_prefix="token-cache") as pool:
            parts = list(pool.map(part, [int(s) for s in np.unique(shard_of)]))
        if not parts:
            return RECORD_SCHEMA.empty_table()
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def _read_rows(self, path: Path, ids: np.ndarray) -> pa.Table:
        f = pq.ParquetFile(path)
        stored = f.read(columns=[keys.CELL_ID]).column(0).to_numpy()  # sorted
        if not len(stored):
            return RECORD_SCHEMA.empty_table()
        rows = np.searchsorted(stored, ids)
        rows = rows[(rows < len(stored)) & (stored[np.minimum(rows, len(stored) - 1)] == ids)]
        if not len(rows):
            return RECORD_SCHEMA.empty_table()
        per_group = self.cfg.row_group_cells
        groups = np.unique(rows // per_group)
        table = f.read_row_groups(groups.tolist(), columns=RECORD_SCHEMA.names)
        # Row r of the shard is row (r - start of its group) + rows before that group in `table`.
        before = np.zeros(groups.max() + 1, np.int64)
        before[groups] = np.arange(len(groups)) * per_group
        local = before[rows // per_group] + rows % per_group
        return table.take(pa.array(local)).cast(RECORD_SCHEMA)

    def _build(self, src: ResolvedSource, shard: int, tok: TokenizerConfig, cls_id: int) -> None:
        from data_ingest.datasource import read_token_table
        from data_ingest.source import open_experiment

        lo = shard * self.cfg.shard_cells
        hi = lo + self.cfg.shard_cells - 1
        with open_experiment(src.soma_uri, src.tiledb_config) as exp:
            present = (
                exp.obs.read(coords=(slice(lo, hi),), column_names=[keys.SOMA_JOINID])
                .concat()
                .column(0)
                .to_numpy()
            )
        table = read_token_table(src, np.sort(present), tok, cls_id)
        order = pc.sort_indices(table, [(keys.CELL_ID, "ascending")])
        table = table.take(order)
        path = self.shard_path(shard)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{uuid.uuid4().hex[:6]}.")
        os.close(fd)
        try:
            pq.write_table(
                table,
                tmp,
                row_group_size=self.cfg.row_group_cells,
                compression=self.cfg.compression,
            )
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
