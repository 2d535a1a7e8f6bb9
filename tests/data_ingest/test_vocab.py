import json

import pytest

from data_ingest import keys
from data_ingest.vocab import GeneVocab


def test_specials_first_and_roundtrip(tmp_path):
    vocab = GeneVocab.from_genes(["CD3E", "MS4A1"])
    assert [vocab[t] for t in keys.SPECIAL_TOKENS] == [0, 1, 2]
    assert vocab["CD3E"] == 3 and vocab.token(4) == "MS4A1"
    vocab.save(tmp_path / "vocab.json")
    # scGPT's format: a flat {token: id} JSON object.
    assert json.loads((tmp_path / "vocab.json").read_text())["MS4A1"] == 4
    assert GeneVocab.load(tmp_path / "vocab.json") == vocab


def test_extend_keeps_existing_ids():
    vocab = GeneVocab.from_genes(["A", "B"])
    before = vocab.to_dict()
    assert vocab.extend(["B", "C"]) == ["C"]
    assert {k: vocab[k] for k in before} == before and vocab["C"] == len(before)


def test_bad_vocabularies(tmp_path):
    with pytest.raises(ValueError, match="duplicate gene"):
        GeneVocab.from_genes(["A", "A"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GeneVocab.load(tmp_path / "bad.json")
    (tmp_path / "gap.json").write_text(json.dumps({"<pad>": 0, "<cls>": 1, "<eoc>": 5}))
    with pytest.raises(ValueError, match="contiguous"):
        GeneVocab.load(tmp_path / "gap.json")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        GeneVocab.load(tmp_path / "missing.json")


def test_lookup_unknown():
    vocab = GeneVocab.from_genes(["A"])
    assert vocab.lookup(["A", "Z"]).tolist() == [3, -1]
