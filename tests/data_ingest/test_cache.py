"""The Arrow token cache: the same batches as reading SOMA, served without SOMA on the second epoch, and a
new entry (never the stale one) when the tokenizer config changes."""

import json
import shutil
from pathlib import Path

import pytest

from data_ingest import keys
from data_ingest.cache import KEY_FILE, CacheEntry, TokenCacheConfig, cache_key
from data_ingest.source import TRAIN, SomaCellSource, SourceConfig
from data_ingest.stream import StreamConfig, rank_batches
from data_ingest.tokenize import TokenizerConfig
from data_ingest.vocab import GeneVocab

BATCH = 16


@pytest.fixture
def soma_copy(demo_soma, tmp_path) -> Path:
    path = tmp_path / "soma"
    shutil.copytree(demo_soma, path)
    return path


def _stream(src, vocab, tok, epoch, cache_dir=None):
    cache = TokenCacheConfig(
        dir=None if cache_dir is None else str(cache_dir), shard_cells=64, record_batch_cells=16
    )
    cfg = StreamConfig(chunk_size=16, buffer_size=128, prefetch=2, token_cache=cache)
    return list(
        rank_batches(
            src,
            tok,
            vocab.cls_id,
            seed=4,
            epoch=epoch,
            rank=0,
            world_size=1,
            batch_size=BATCH,
            cfg=cfg,
        )
    )


def _same(a, b):
    return len(a) == len(b) and all(x.equals(y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_cache_hits_on_second_epoch_and_invalidates(ray_local, soma_copy, tmp_path):
    src = SomaCellSource(SourceConfig(soma_uri=str(soma_copy), layer="data"))
    vocab = GeneVocab.from_genes(src.gene_names())
    res = src.resolve(vocab, TRAIN)
    tok = TokenizerConfig(max_seq_len=32)
    plain = {e: _stream(res, vocab, tok, e) for e in (0, 1)}
    cache_dir = tmp_path / "cache"

    # Epoch 0 builds the shards it touches and yields exactly the uncached batches.
    first = _stream(res, vocab, tok, 0, cache_dir)
    assert _same(first, plain[0])
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    shards = sorted(entry.glob("shard_*.arrow"))
    n_cells = int(res.joinids.max()) + 1
    assert len(shards) == -(-n_cells // 64)  # every shard of the experiment was needed
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    material = json.loads((entry / KEY_FILE).read_text())
    assert material["tokenizer"]["max_seq_len"] == 32 and material["soma_uri"] == res.soma_uri

    # Epoch 1 with the experiment gone: every record comes from the cache, no shard is rewritten.
    moved = soma_copy.with_name("gone")
    soma_copy.rename(moved)
    try:
        second = _stream(res, vocab, tok, 1, cache_dir)
        assert _same(second, plain[1])
        assert {p: p.stat().st_mtime_ns for p in entry.glob("shard_*.arrow")} == stamps
        # Another tokenizer config is another entry: the stale records are not used (nothing to read).
        other = TokenizerConfig(max_seq_len=24)
        with pytest.raises(Exception, match="cannot open a SOMA experiment"):
            _stream(res, vocab, other, 1, cache_dir)
    finally:
        moved.rename(soma_copy)
    rebuilt = _stream(res, vocab, other, 1, cache_dir)
    assert _same(rebuilt, _stream(res, vocab, other, 1))
    assert max(len(g) for b in rebuilt for g in b[keys.GENES].to_pylist()) == 24
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 2
    assert {p: p.stat().st_mtime_ns for p in entry.glob("shard_*.arrow")} == stamps


def test_key_covers_what_records_depend_on(demo_soma):
    src = SomaCellSource(SourceConfig(soma_uri=str(demo_soma), layer="data"))
    vocab = GeneVocab.from_genes(src.gene_names())
    res = src.resolve(vocab, TRAIN)
    cfg = TokenCacheConfig(dir="unused")
    tok = TokenizerConfig()
    key = cache_key(res, tok, vocab.cls_id, cfg)[0]
    assert key == cache_key(res, TokenizerConfig(), vocab.cls_id, cfg)[0]  # stable
    changed = [
        cache_key(res, TokenizerConfig(seed=1), vocab.cls_id, cfg),
        cache_key(res, TokenizerConfig(n_bins=21), vocab.cls_id, cfg),
        cache_key(res, tok, vocab.cls_id + 1, cfg),
        cache_key(res, tok, vocab.cls_id, TokenCacheConfig(dir="unused", shard_cells=512)),
    ]
    fewer_genes = res.feature_tokens.copy()
    fewer_genes[0] = -1
    import dataclasses

    for field, value in (
        ("feature_tokens", fewer_genes),
        ("soma_uri", res.soma_uri + "2"),
        ("layer", "raw"),
        ("batch_categories", res.batch_categories[:-1]),
    ):
        changed.append(
            cache_key(dataclasses.replace(res, **{field: value}), tok, vocab.cls_id, cfg)
        )
    assert len({key, *(k for k, _ in changed)}) == 1 + len(changed)
    with pytest.raises(ValueError, match="token cache is off"):
        CacheEntry.open(res, tok, vocab.cls_id, TokenCacheConfig())


def test_entry_reads_equal_direct_reads(demo_soma, tmp_path):
    import numpy as np

    from data_ingest.datasource import read_token_table

    src = SomaCellSource(SourceConfig(soma_uri=str(demo_soma), layer="data"))
    vocab = GeneVocab.from_genes(src.gene_names())
    res = src.resolve(vocab, TRAIN)
    tok = TokenizerConfig(max_seq_len=40, min_genes=300)  # some cells skipped
    cfg = TokenCacheConfig(dir=str(tmp_path), shard_cells=50, record_batch_cells=8)
    entry = CacheEntry.open(res, tok, vocab.cls_id, cfg)
    rng = np.random.default_rng(0)
    for n in (1, 37, 300):
        ids = np.sort(rng.choice(res.joinids, n, replace=False))
        direct = read_token_table(res, ids, tok, vocab.cls_id, compact=True)
        assert entry.read(res, ids, tok, vocab.cls_id).equals(direct)
    assert 0 < len(entry.shards()) <= -(-(int(res.joinids.max()) + 1) // 50)
