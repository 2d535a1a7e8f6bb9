"""Gene vocabulary: gene name <-> token id, with scGPT's special tokens and `vocab.json` format."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from data_ingest import keys
from data_ingest.atomic import write_text_atomic  # noqa: F401  (re-exported)


class GeneVocab:
    """An append-only mapping from gene names to contiguous token ids.

    Ids never change once assigned: extending the vocabulary (a new census release with new genes)
    appends. The on-disk format is scGPT's `vocab.json`: a JSON object `{token: id}`.
    """

    def __init__(self, token_to_id: dict[str, int]):
        ids = sorted(token_to_id.values())
        if ids != list(range(len(ids))):
            raise ValueError("vocabulary ids must be contiguous from 0; the vocab.json is damaged")
        self._token_to_id = dict(token_to_id)
        self._id_to_token = [""] * len(ids)
        for token, idx in token_to_id.items():
            self._id_to_token[idx] = token
        for token in keys.SPECIAL_TOKENS:
            if token not in self._token_to_id:
                raise ValueError(
                    f"vocabulary lacks special token {token!r}; build it with GeneVocab.from_genes"
                )

    @classmethod
    def from_genes(cls, genes: Iterable[str]) -> GeneVocab:
        """Specials first (`<pad>`=0, `<cls>`=1, `<eoc>`=2), then genes in the order given."""
        mapping: dict[str, int] = {t: i for i, t in enumerate(keys.SPECIAL_TOKENS)}
        for gene in genes:
            gene = str(gene)
            if gene in mapping:
                raise ValueError(f"duplicate gene name {gene!r}; make gene names unique first")
            mapping[gene] = len(mapping)
        return cls(mapping)

    def extend(self, genes: Iterable[str]) -> list[str]:
        """Append genes not yet known; return the newly added names. Existing ids are unchanged."""
        added = []
        for gene in genes:
            gene = str(gene)
            if gene not in self._token_to_id:
                self._token_to_id[gene] = len(self._id_to_token)
                self._id_to_token.append(gene)
                added.append(gene)
        return added

    def __len__(self) -> int:
        return len(self._id_to_token)

    def __contains__(self, token: str) -> bool:
        return token in self._token_to_id

    def __getitem__(self, token: str) -> int:
        return self._token_to_id[token]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self._token_to_id == other._token_to_id

    @property
    def pad_id(self) -> int:
        return self._token_to_id[keys.PAD_TOKEN]

    @property
    def cls_id(self) -> int:
        return self._token_to_id[keys.CLS_TOKEN]

    def token(self, idx: int) -> str:
        return self._id_to_token[idx]

    def lookup(self, genes: Sequence[str], unknown: int = -1) -> np.ndarray:
        """Token id of each gene name, `unknown` where the gene is not in the vocabulary."""
        return np.array([self._token_to_id.get(str(g), unknown) for g in genes], dtype=np.int64)

    def to_dict(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def save(self, path: str | os.PathLike) -> None:
        """Write scGPT `vocab.json` atomically."""
        write_text_atomic(path, json.dumps(self._token_to_id, indent=0))

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneVocab:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no vocabulary at {path}; pass the vocab.json of the checkpoint"
            )
        try:
            mapping = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); it is not a scGPT vocab.json"
            ) from err
        if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
            raise ValueError(f"{path} must map gene names to integer ids, like scGPT's vocab.json")
        return cls(mapping)

    def fingerprint(self) -> str:
        """A short hash of the mapping, to key caches and validate checkpoints against data."""
        import hashlib

        blob = json.dumps(self._token_to_id, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
