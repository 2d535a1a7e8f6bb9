"""Attention backends behind one function.

`sdpa` uses `torch.nn.functional.scaled_dot_product_attention` with a boolean mask (True = may attend) and runs
everywhere. `flash` uses flash-attn 2 when it is installed and a CUDA device is present; otherwise it logs once
and falls back to `sdpa`.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash")


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


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Scaled dot-product attention.

    q, k, v: (B, H, L, Dh). key_padding_mask: (B, L), True at padding. Returns (B, H, L, Dh).
    """
    if resolve_backend(backend) == "flash" and q.dtype in (torch.float16, torch.bfloat16):
        return _flash(q, k, v, key_padding_mask, dropout_p)
    mask = None
    if key_padding_mask is not None:
        mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, L) True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _flash(q, k, v, key_padding_mask, dropout_p):  # pragma: no cover - needs a GPU
    from flash_attn import flash_attn_varlen_func

    b, h, seq, dh = q.shape
    keep = (
        torch.ones(b, seq, dtype=torch.bool, device=q.device)
        if key_padding_mask is None
        else ~key_padding_mask
    )
    lens = keep.sum(1, dtype=torch.int32)  # (B,)
    cu = F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    idx = keep.flatten().nonzero().squeeze(1)

    def pack(x):  # (B, H, L, Dh) -> (T, H, Dh)
        return x.transpose(1, 2).reshape(b * seq, h, dh)[idx]

    out = flash_attn_varlen_func(
        pack(q), pack(k), pack(v), cu, cu, int(lens.max()), int(lens.max()), dropout_p=dropout_p
    )  # (T, H, Dh)
    full = q.new_zeros(b * seq, h, dh)
    full[idx] = out
    return full.view(b, seq, h, dh).transpose(1, 2)
