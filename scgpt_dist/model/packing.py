"""A batch's real tokens, packed: where each cell's tokens sit in the (T, ...) packed layout and the padded
(B, L) one, the index maps between them, length groups for the `varlen` backend, and the generative mask."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Packing:
    """Where each cell's real tokens sit in the packed token list. Tokens of a cell are contiguous and keep
    their order; cell b owns packed rows `cu_seqlens[b]:cu_seqlens[b + 1]`.

    Built once per forward; the attention masks and length groups derived from it are cached on it, so the
    layers share them.
    """

    keep: torch.Tensor
    """(B, L) True at real (non-padding) tokens."""
    index: torch.Tensor
    """(T,) flat position in the (B * L) padded layout of each packed token."""
    seq_id: torch.Tensor
    """(T,) cell of each packed token."""
    cu_seqlens: torch.Tensor
    """(B + 1,) int32 cumulative lengths (flash-attn's layout)."""
    lengths: list[int]
    """Tokens per cell, on the host."""
    dense: bool = False
    """No padding at all: packing and unpacking are reshapes (no copies)."""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_padding(cls, key_padding_mask: torch.Tensor) -> Packing:
        keep = ~key_padding_mask.bool()  # (B, L)
        lens = keep.sum(1)  # (B,)
        b, seq = keep.shape
        lengths = lens.tolist()  # the one host sync of a forward
        seq_id = torch.arange(b, device=keep.device).repeat_interleave(lens)  # (T,)
        dense = all(n == seq for n in lengths)
        index = (
            torch.arange(b * seq, device=keep.device)
            if dense
            else keep.flatten().nonzero().squeeze(1)
        )  # (T,)
        return cls(
            keep=keep,
            index=index,
            seq_id=seq_id,
            cu_seqlens=F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0)),
            lengths=lengths,
            dense=dense,
        )

    @property
    def batch_size(self) -> int:
        return self.keep.shape[0]

    @property
    def seq_len(self) -> int:
        return self.keep.shape[1]

    @property
    def first(self) -> torch.Tensor:
        """(B,) packed row of each cell's first token (`<cls>`)."""
        return self.cu_seqlens[:-1].long()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (T, ...)."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self.dense else flat[self.index]

    def unpack(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(T, ...) -> (B, L, ...), `fill` at padding."""
        if self.dense:
            return x.view(self.batch_size, self.seq_len, *x.shape[1:])
        out = x.new_full((self.batch_size * self.seq_len, *x.shape[1:]), fill)
        out = out.index_copy(0, self.index, x)
        return out.view(self.batch_size, self.seq_len, *x.shape[1:])

    def cached(self, key: tuple, build):
        """`build()` once per packing and key (masks shared by all layers of a forward)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def length_groups(self) -> list[tuple[int, torch.Tensor | None, slice | None]]:
        """Cells grouped by length: (length, packed rows of the group's tokens (G * length,) or None when
        they are one contiguous slice, that slice or None)."""

        def build():
            by_len: dict[int, list[int]] = {}
            for b, n in enumerate(self.lengths):
                by_len.setdefault(n, []).append(b)
            starts = [0]
            for n in self.lengths:
                starts.append(starts[-1] + n)
            groups = []
            for n, cells in by_len.items():
                if n == 0:
                    continue
                if cells == list(range(cells[0], cells[-1] + 1)):
                    groups.append((n, None, slice(starts[cells[0]], starts[cells[-1] + 1])))
                else:
                    rows = torch.cat(
                        [
                            torch.arange(starts[b], starts[b] + n, device=self.keep.device)
                            for b in cells
                        ]
                    )
                    groups.append((n, rows, None))
            return groups

        return self.cached(("groups",), build)

    def group_order(self) -> torch.Tensor | None:
        """(T,) gather that puts the tokens of `length_groups`, concatenated, back in packed order; None when
        they already are."""

        def build():
            parts = []
            for _, rows, sl in self.length_groups():
                parts.append(torch.arange(sl.start, sl.stop) if rows is None else rows.cpu())
            perm = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            if torch.equal(perm, torch.arange(len(perm))):
                return None
            return torch.argsort(perm).to(self.keep.device)

        return self.cached(("group_order",), build)


def generative_mask(gen: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (True = may attend), (B, 1, L, L), from unknown-gene flags `gen` (B, L).

    Query i may attend key j when j is a real token and (j is a prompt token or j == i).
    """
    seq = gen.shape[1]
    eye = torch.eye(seq, dtype=torch.bool, device=gen.device)  # (L, L)
    allowed = (keep & ~gen)[:, None, :] | eye  # (B, L, L)
    return allowed[:, None]  # (B, 1, L, L)
