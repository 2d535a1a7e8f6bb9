"""Token records (Arrow) -> padded tensors, and GEP value masking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from data_ingest import keys

if (
    TYPE_CHECKING
):  # Arrow comes in with the data: the model package itself imports torch and numpy only
    import pyarrow as pa


@dataclass
class Batch:
    """A padded batch. genes/values/padding/perturbation: (B, L); batch/label/cell_id/modality: (B,)."""

    genes: torch.Tensor
    values: torch.Tensor
    padding: torch.Tensor
    batch: torch.Tensor
    label: torch.Tensor
    cell_id: torch.Tensor
    modality: torch.Tensor | None = None
    """Modality (data_ingest.keys.MODALITY_*) per cell (B,) or per token (B, L), when the records carry it."""
    perturbation: torch.Tensor | None = None
    """Per-gene perturbation flags (padding = 2), when the records carry them."""
    views: tuple[Batch, Batch] | None = None
    """The same cells' two thinned-count records (`keys.VIEW_GENES[i]` / `keys.VIEW_VALUES[i]`), when the
    records carry them (tokenizer.thinned_view > 0)."""

    @property
    def n_tokens(self) -> int:
        return int((~self.padding).sum())


def _pad_lists(col: pa.ChunkedArray | pa.Array, fill: int, dtype) -> np.ndarray:
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col  # ChunkedArray or Array
    offsets = arr.offsets.to_numpy()
    offsets = offsets - offsets[0]
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    out = np.full((len(arr), int(lengths.max()) if len(arr) else 0), fill, dtype=dtype)
    rows = np.repeat(np.arange(len(arr)), lengths)
    cols = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
    out[rows, cols] = flat
    return out


def collate(table: pa.Table, pad_id: int) -> Batch:
    """Pad a table of token records to the longest cell in it."""
    genes = _pad_lists(table[keys.GENES], pad_id, np.int64)
    values = _pad_lists(table[keys.VALUES], keys.PAD_VALUE, np.float32)
    label = table[keys.LABEL].to_numpy() if keys.LABEL in table.column_names else None
    modality = perturbation = None
    if keys.MODALITY in table.column_names:
        col = table[keys.MODALITY]
        # Per-token modality (B, L) from a list column; padding reads as RNA and is never used.
        if col.type.num_fields == 1:  # a list column (a primitive type has no child fields)
            modality = torch.from_numpy(_pad_lists(col, keys.MODALITY_RNA, np.int64))
        else:
            modality = torch.from_numpy(col.to_numpy().astype(np.int64))
    if keys.PERTURBATION in table.column_names:
        perturbation = torch.from_numpy(_pad_lists(table[keys.PERTURBATION], 2, np.int64))
    views = None
    if keys.VIEW_GENES[0] in table.column_names:
        views = tuple(
            collate(
                table.select([g, v, keys.BATCH, keys.CELL_ID]).rename_columns(
                    [keys.GENES, keys.VALUES, keys.BATCH, keys.CELL_ID]
                ),
                pad_id,
            )
            for g, v in zip(keys.VIEW_GENES, keys.VIEW_VALUES, strict=True)
        )
    return Batch(
        genes=torch.from_numpy(genes),
        values=torch.from_numpy(values),
        padding=torch.from_numpy(genes == pad_id),
        batch=torch.from_numpy(table[keys.BATCH].to_numpy().astype(np.int64)),
        label=torch.from_numpy(
            label.astype(np.int64) if label is not None else np.full(len(genes), -1, np.int64)
        ),
        cell_id=torch.from_numpy(table[keys.CELL_ID].to_numpy().astype(np.int64)),
        modality=modality,
        perturbation=perturbation,
        views=views,
    )


def mask_values(
    values: torch.Tensor, mask_ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask `mask_ratio` of each cell's gene values (never `<cls>` or padding, which hold PAD_VALUE).

    Returns (masked input values, boolean mask of masked positions), both (B, L). As in the reference, each
    cell masks `int(n_genes * mask_ratio)` positions chosen uniformly.
    """
    maskable = values != keys.PAD_VALUE  # (B, L)
    n_mask = (maskable.sum(1).to(torch.float32) * mask_ratio).long()  # (B,)
    scores = torch.rand(values.shape, generator=generator)
    scores = scores.masked_fill(~maskable, 2.0)  # never picked
    ranks = scores.argsort(1).argsort(1)  # (B, L) rank of each position
    mask = ranks < n_mask[:, None]
    return values.masked_fill(mask, float(keys.MASK_VALUE)), mask


def draw_mask_ratio(mask_ratio: float, schedule: list[float], generator: torch.Generator) -> float:
    """The mask ratio of one micro-batch: uniformly one of `schedule` (the reference's [0.25, 0.5, 0.75]
    for generative pretraining) or, when it is empty, `mask_ratio`."""
    if not schedule:
        return mask_ratio
    return float(schedule[int(torch.randint(len(schedule), (1,), generator=generator))])
