"""Attention backends behind one function, on packed tokens.

The model keeps a batch's real tokens packed, (T, ...) with T = the number of non-padding tokens, so token-wise
layers never compute padding. `attend` runs self-attention on the packed q, k, v:

- `sdpa`: scatter into a padded (B, H, L, Dh) batch and call `torch.nn.functional.scaled_dot_product_attention`
  with a boolean mask (True = may attend) built from the key padding and the generative mask. Runs everywhere.
- `varlen`: one attention call per cell on that cell's tokens only (padding costs nothing, not even in
  attention; on CPU the per-call overhead measured slower than `sdpa` at 8 cells x 512 genes).
- `flash`: flash-attn 2 `flash_attn_varlen_func` on the packed tokens, when it is installed and a CUDA device is
  present and q is fp16/bf16; otherwise it logs once and falls back to `sdpa`. The generative mask is not a
  flash-attn mask, so masked (generative) calls also use `sdpa`.

Generative attention mask (scGPT paper): a cell's genes are known ("prompt") or unknown (values generated).
Prompt tokens attend to the cell's prompt tokens; an unknown token attends to the prompt tokens and itself.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "varlen", "flash")


@functools.cache
def flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def resolve_backend(name: str) -> str:
    """The backend that will actually run for the requested one."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "flash" and not flash_available():
        log.warning(
            "flash-attn is not usable here (needs the [gpu] extra and CUDA); using PyTorch SDPA"
        )
        return "sdpa"
    return name


@dataclass
class Packing:
    """Where each cell's real tokens sit in the packed token list. Tokens of a cell are contiguous and keep
    their order; cell b owns packed rows `cu_seqlens[b]:cu_seqlens[b + 1]`."""

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

    @classmethod
    def from_padding(cls, key_padding_mask: torch.Tensor) -> Packing:
        keep = ~key_padding_mask.bool()  # (B, L)
        lens = keep.sum(1)  # (B,)
        b, seq = keep.shape
        seq_id = torch.arange(b, device=keep.device).repeat_interleave(lens)  # (T,)
        return cls(
            keep=keep,
            index=keep.flatten().nonzero().squeeze(1),
            seq_id=seq_id,
            cu_seqlens=F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0)),
            lengths=lens.tolist(),
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
        return x.reshape(-1, *x.shape[2:])[self.index]

    def unpack(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(T, ...) -> (B, L, ...), `fill` at padding."""
        out = x.new_full((self.batch_size * self.seq_len, *x.shape[1:]), fill)
        out = out.index_copy(0, self.index, x)
        return out.view(self.batch_size, self.seq_len, *x.shape[1:])


def generative_mask(gen: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (True = may attend), (B, 1, L, L), from unknown-gene flags `gen` (B, L).

    Query i may attend key j when j is a real token and (j is a prompt token or j == i).
    """
    seq = gen.shape[1]
    eye = torch.eye(seq, dtype=torch.bool, device=gen.device)  # (L, L)
    allowed = (keep & ~gen)[:, None, :] | eye  # (B, L, L)
    return allowed[:, None]  # (B, 1, L, L)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    """Scaled dot-product attention, (..., H, L, Dh) -> (..., H, L, Dh); mask True = may attend.

    With dropout on CPU, PyTorch's SDPA takes its slow math path (about 15x the cost of the dropout-free fused
    kernel); the explicit softmax + one random draw per attention weight here computes the same thing several
    times faster. Everywhere else this is `F.scaled_dot_product_attention`.
    """
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (..., H, L, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    attn = scores.softmax(-1)
    keep = (
        torch.rand_like(attn) >= dropout_p
    )  # bool: cheaper to draw and keep than bernoulli floats
    attn = torch.where(keep, attn * (1.0 / (1.0 - dropout_p)), 0.0)
    return attn @ v  # (..., H, L, Dh)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packing: Packing,
    dropout_p: float,
    backend: str = "sdpa",
    gen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention of packed tokens within their cell.

    q, k, v: (T, H, Dh). gen: (T,) True at unknown genes (generative mask) or None. Returns (T, H, Dh).
    """
    name = resolve_backend(backend)
    if name == "flash" and gen is None and q.dtype in (torch.float16, torch.bfloat16):
        return _flash(q, k, v, packing, dropout_p)
    if name == "varlen":
        return _varlen(q, k, v, packing, dropout_p, gen)
    return _padded(q, k, v, packing, dropout_p, gen)


def _padded(q, k, v, packing: Packing, dropout_p: float, gen: torch.Tensor | None):
    def pad(x):  # (T, H, Dh) -> (B, H, L, Dh)
        return packing.unpack(x).transpose(1, 2)

    if gen is None:
        mask = packing.keep[:, None, None, :]  # (B, 1, 1, L)
    else:
        gen_padded = packing.unpack(gen, fill=False)  # (B, L)
        mask = generative_mask(gen_padded, packing.keep)  # (B, 1, L, L)
    out = sdpa(pad(q), pad(k), pad(v), mask, dropout_p)  # (B, H, L, Dh)
    return packing.pack(out.transpose(1, 2))  # (T, H, Dh)


def _varlen(q, k, v, packing: Packing, dropout_p: float, gen: torch.Tensor | None):
    outs = []
    start = 0
    for n in packing.lengths:
        sl = slice(start, start + n)
        start += n
        mask = None
        if gen is not None and bool(gen[sl].any()):
            eye = torch.eye(n, dtype=torch.bool, device=q.device)
            mask = ~gen[sl][None, :] | eye  # (Li, Li)
        qi, ki, vi = (x[sl].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, Li, Dh)
        o = sdpa(qi, ki, vi, mask, dropout_p)
        outs.append(o.squeeze(0).transpose(0, 1))  # (Li, H, Dh)
    return torch.cat(outs, 0)  # (T, H, Dh)


def _flash(q, k, v, packing: Packing, dropout_p: float):  # pragma: no cover - needs a GPU
    from flash_attn import flash_attn_varlen_func

    max_len = max(packing.lengths)
    cu = packing.cu_seqlens.to(q.device)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p)
