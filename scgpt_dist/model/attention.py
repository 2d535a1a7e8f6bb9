"""Attention backends behind one function, on packed tokens.

The model keeps a batch's real tokens packed, (T, ...) with T = the number of non-padding tokens, so token-wise
layers never compute padding. `attend` runs self-attention on the packed q, k, v:

- `sdpa`: scatter into a padded (B, H, L, Dh) batch and attend with a boolean mask (True = may attend) built
  once per forward from the key padding and the generative mask; no mask at all when the batch has neither
  (PyTorch then picks its fused kernel). Runs everywhere.
- `varlen`: cells grouped by length, one attention call per group on those cells' tokens only (padding costs
  nothing, not even in attention; a batch of equal-length cells is one call).
- `flash`: flash-attn 2 `flash_attn_varlen_func` on the packed tokens, when it is installed and a CUDA device is
  present and q is fp16/bf16; otherwise it logs once and falls back to `sdpa`. The generative mask is not a
  flash-attn mask, so masked (generative) calls also use `sdpa`.
- `flex`: FlexAttention (`torch.nn.attention.flex_attention`) on the packed tokens with a block mask (same cell,
  and the generative rule) built once per forward: block-sparse, so a generative pass skips the blocks of
  unknown genes. Compiled on CUDA. FlexAttention has no attention dropout and no backward on CPU: those calls
  use `varlen` (logged once).

Attention dropout on CPU: PyTorch's SDPA takes its slow math path with dropout (Bernoulli draws + several
copies of the (B, H, L, L) weights); `attention_math` here computes the same function with one fused autograd
node that works in place on the weights and draws the dropout mask from 16 random bits per weight (so p is
rounded to a multiple of 2**-16, and the scale uses the rounded p: still exactly inverted dropout).

Generative attention mask (scGPT paper): a cell's genes are known ("prompt") or unknown (values generated).
Prompt tokens attend to the cell's prompt tokens; an unknown token attends to the prompt tokens and itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F

from scgpt_dist.model.packing import Packing, generative_mask

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "varlen", "flash", "flex")


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


@functools.cache
def _note_once(message: str) -> None:
    log.info(message)


# ----------------------------------------------------------------------------------------------- math path


class Workspace:
    """Reusable flat buffers for the (..., H, L, L) attention weights on CPU.

    CPU tensors this large are fresh `mmap`s: each allocation page-faults and zeroes its pages, which costs
    more than the softmax over them. A layer takes its buffers in the forward and gives them back at the end
    of its backward (or of the forward when no backward follows), so a training step reuses the previous
    step's memory. A request is served by the smallest free buffer that holds it and is at most twice its
    size (batches of varying length reuse each other's buffers); the oldest free buffers are released past
    `max_bytes`. Buffers in use are ordinary tensors: one never given back is simply garbage-collected.
    """

    def __init__(self, max_bytes: int = 2**31):
        self.max_bytes = max_bytes
        """Free buffers kept at most (bytes); the oldest beyond it are released to the allocator."""
        self.enabled = True
        """False: plain allocations, and a backward may run more than once (retain_graph, gradcheck)."""
        self._free: list[torch.Tensor] = []
        self._bytes = 0

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D tensor of `numel` elements (uninitialized), a view of a free buffer when one fits."""
        best = None
        if self.enabled:
            for i, buf in enumerate(self._free):
                fits = buf.dtype == dtype and buf.device == device
                if fits and numel <= buf.numel() <= 2 * numel + 4096:
                    if best is None or buf.numel() < self._free[best].numel():
                        best = i
        if best is None:
            return torch.empty(numel, dtype=dtype, device=device)
        buf = self._free.pop(best)
        self._bytes -= buf.numel() * buf.element_size()
        return buf[:numel]

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Return tensors obtained from `take` (or views of them; None entries are skipped)."""
        for t in tensors:
            if t is None or t.device.type != "cpu" or not self.enabled:
                continue
            root = t if t._base is None else t._base
            if root.dim() != 1 or any(root is buf for buf in self._free):
                continue
            self._free.append(root)
            self._bytes += root.numel() * root.element_size()
            while self._bytes > self.max_bytes:
                old = self._free.pop(0)
                self._bytes -= old.numel() * old.element_size()

    @contextlib.contextmanager
    def disabled(self):
        """Within: no buffer reuse (for code that runs a backward twice)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    @property
    def held_bytes(self) -> int:
        """Bytes of the free buffers held."""
        return self._bytes

    def clear(self) -> None:
        """Release every free buffer."""
        self._free.clear()
        self._bytes = 0


WORKSPACE = Workspace()
"""The process's attention workspace (CPU)."""


def _take(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor of `shape`; on CPU a view of a workspace buffer."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = 1
    for s in shape:
        n *= s
    return WORKSPACE.take(n, dtype, device).view(shape)


def _give(*tensors: torch.Tensor | None) -> None:
    """Give back tensors made by `_take` (views of workspace buffers)."""
    WORKSPACE.give(*tensors)


def dropout_keep_mask(
    shape: tuple[int, ...], p: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, float]:
    """Inverted-dropout keep mask (float32 0.0 / 1.0, `shape`, in a workspace buffer) and its scale
    1 / (1 - p').

    Each element takes 16 bits of a full-range int64 draw (4 elements per draw: several times cheaper than
    `torch.rand` or `bernoulli_` on CPU), made into a float u in [1, 2) by bit operations, and is kept when
    floor(u - p') = 1: dropped with probability p' = round(p * 2**16) / 2**16, which the scale also uses, so
    the output stays unbiased.
    """
    device = torch.device(device)
    n = 1
    for s in shape:
        n *= s
    threshold = round(p * 65536)
    if n % 4:  # odd sizes (tests, tiny models): plain uniform draws
        u = torch.rand(shape, device=device).add_(1.0)
        keep = u.sub_(threshold / 65536).floor_()
        return keep, 1.0 / (1.0 - threshold / 65536)
    bits = torch.empty(n // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    bits = bits.view(torch.int32)  # (n / 2,) two 16-bit draws each
    out = _take((n,), torch.float32, device).view(torch.int32)
    lo, hi = out.view(2, n // 2).unbind(0)
    torch.bitwise_and(bits, 0xFFFF, out=lo)
    torch.bitwise_right_shift(bits, 16, out=hi)
    hi.bitwise_and_(0xFFFF)
    out.bitwise_left_shift_(7).bitwise_or_(0x3F800000)  # 16 random mantissa bits, exponent of 1.0
    keep = out.view(torch.float32).sub_(threshold / 65536).floor_()  # (n,) 0.0 or 1.0
    return keep.view(shape), 1.0 / (1.0 - threshold / 65536)


class _AttentionMath(torch.autograd.Function):
    """softmax(q k^T / sqrt(Dh) + bias) with inverted dropout, @ v; one autograd node.

    Holds two (..., H, Lq, Lk) workspace buffers per layer between forward and backward (the softmax
    weights and the weights after dropout), works in place on them, and takes one more in the backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, keep, keep_scale, for_backward):
        scale = q.shape[-1] ** -0.5
        shape = (*q.shape[:-1], k.shape[-2])
        probs = _take(shape, q.dtype, q.device)  # (..., H, Lq, Lk)
        torch.matmul(q * scale, k.transpose(-2, -1), out=probs)
        if bias is not None:
            probs.add_(bias)  # 0 where allowed, -inf where not
        torch.ops.aten._softmax.out(probs, -1, False, out=probs)  # in place
        if keep is None:
            dropped = probs
            out = torch.matmul(probs, v)  # (..., H, Lq, Dh)
        else:
            dropped = keep.mul_(probs)  # the keep mask's buffer becomes the dropped weights
            out = torch.matmul(dropped, v).mul_(keep_scale)  # (..., H, Lq, Dh)
        if for_backward:
            ctx.save_for_backward(q, k, v)
            ctx.probs, ctx.dropped = probs, dropped
            ctx.scale, ctx.keep_scale = scale, keep_scale
        else:
            _give(probs, None if keep is None else dropped)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        probs, dropped = ctx.probs, ctx.dropped
        if probs is None:
            raise RuntimeError(
                "attention backward ran twice on one graph (retain_graph=True), but its buffers went back "
                "to the workspace after the first; run it under `attention.WORKSPACE.disabled()`"
            )
        if WORKSPACE.enabled:
            ctx.probs = ctx.dropped = None
        if dropped is not probs:
            grad_out = grad_out * ctx.keep_scale
        grad_v = torch.matmul(dropped.transpose(-2, -1), grad_out)  # (..., H, Lk, Dh)
        g = _take(probs.shape, probs.dtype, probs.device)  # (..., H, Lq, Lk)
        torch.matmul(grad_out, v.transpose(-2, -1), out=g)  # d loss / d dropped
        g.mul_(dropped)  # d loss / d probs, times probs (dropout folded in)
        row = g.sum(-1, keepdim=True)  # (..., H, Lq, 1)
        g.addcmul_(probs, row, value=-1.0)  # d loss / d scores (softmax backward)
        grad_q = torch.matmul(g, k).mul_(ctx.scale)  # (..., H, Lq, Dh)
        grad_k = torch.matmul(g.transpose(-2, -1), q).mul_(ctx.scale)  # (..., H, Lk, Dh)
        _give(g, probs, None if dropped is probs else dropped)
        return grad_q, grad_k, grad_v, None, None, None, None


def attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_p: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with dropout on the weights, (..., H, L, Dh) -> (..., H, L, Dh). `bias` (broadcast to
    (..., H, Lq, Lk)): 0 where a query may attend a key, -inf where not. `keep` (float 0/1 of the weights'
    shape, overwritten) replaces the drawn dropout mask (tests)."""
    keep_scale = 1.0
    if keep is None and dropout_p > 0.0:
        shape = (*q.shape[:-1], k.shape[-2])
        keep, keep_scale = dropout_keep_mask(shape, dropout_p, q.device)
        keep = keep.to(q.dtype)
    elif keep is not None:
        keep_scale = 1.0 / (1.0 - dropout_p)
    q, k, v = (x.contiguous() for x in (q, k, v))
    for_backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    return _AttentionMath.apply(q, k, v, bias, keep, keep_scale, for_backward)


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = may attend) -> additive bias (0 / -inf): adding is far cheaper on CPU than
    `masked_fill` with a boolean mask of the weights' size."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, (..., H, L, Dh) -> (..., H, L, Dh); mask True = may attend.

    With dropout on CPU this is `attention_math` (`bias` = `mask_bias(mask)`: pass it when it is at hand);
    everywhere else `F.scaled_dot_product_attention`.
    """
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if bias is None and mask is not None:
        bias = mask_bias(mask, q.dtype)
    return attention_math(q, k, v, bias, dropout_p)


# ----------------------------------------------------------------------------------------------- backends


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
    if name == "flex":
        if dropout_p == 0.0 and (q.device.type != "cpu" or not torch.is_grad_enabled()):
            return _flex(q, k, v, packing, gen)
        _note_once(
            "flex attention: no dropout / no CPU backward in FlexAttention; these calls use varlen"
        )
        name = "varlen"
    if name == "varlen":
        return _varlen(q, k, v, packing, dropout_p, gen)
    return _padded(q, k, v, packing, dropout_p, gen)


def _padded_masks(packing: Packing, gen: torch.Tensor | None, dtype: torch.dtype):
    """(allowed, bias): boolean mask and additive bias for the padded batch, or (None, None) when nothing is masked."""

    def build():
        if gen is None:
            if packing.dense:
                return None, None
            allowed = packing.keep[:, None, None, :]  # (B, 1, 1, L)
        else:
            gen_padded = packing.unpack(gen, fill=False)  # (B, L)
            allowed = generative_mask(gen_padded, packing.keep)  # (B, 1, L, L)
        return allowed, mask_bias(allowed, dtype)

    return packing.cached(("padded", id(gen), dtype), build)


def _padded(q, k, v, packing: Packing, dropout_p: float, gen: torch.Tensor | None):
    def pad(x):  # (T, H, Dh) -> (B, H, L, Dh)
        return packing.unpack(x).transpose(1, 2)

    allowed, bias = _padded_masks(packing, gen, q.dtype)
    out = sdpa(pad(q), pad(k), pad(v), allowed, dropout_p, bias)  # (B, H, L, Dh)
    return packing.pack(out.transpose(1, 2))  # (T, H, Dh)


def _group_masks(packing: Packing, gen: torch.Tensor | None, dtype: torch.dtype):
    """Per length group: (allowed, bias) (G, 1, n, n) generative masks, or (None, None)."""

    def build():
        masks = []
        for n, rows, sl in packing.length_groups():
            if gen is None:
                masks.append((None, None))
                continue
            g = (gen[sl] if rows is None else gen[rows]).view(-1, n)  # (G, n)
            eye = torch.eye(n, dtype=torch.bool, device=gen.device)
            allowed = (~g[:, None, :] | eye)[:, None]  # (G, 1, n, n)
            masks.append((allowed, mask_bias(allowed, dtype)))
        return masks

    return packing.cached(("groups", id(gen), dtype), build)


def _varlen(q, k, v, packing: Packing, dropout_p: float, gen: torch.Tensor | None):
    groups = packing.length_groups()
    masks = _group_masks(packing, gen, q.dtype)
    t, h, dh = q.shape
    outs = []
    for (n, rows, sl), (allowed, bias) in zip(groups, masks, strict=True):
        qg, kg, vg = (
            (x[sl] if rows is None else x[rows]).view(-1, n, h, dh).transpose(1, 2)
            for x in (q, k, v)
        )  # 3 x (G, H, n, Dh)
        o = sdpa(qg, kg, vg, allowed, dropout_p, bias)  # (G, H, n, Dh)
        outs.append(o.transpose(1, 2).reshape(-1, h, dh))  # (G * n, H, Dh)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (T, H, Dh), in group order
    order = packing.group_order()
    return out if order is None else out[order]  # (T, H, Dh), in packed order


@functools.cache
def _flex_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention


def _flex_block_mask(packing: Packing, gen: torch.Tensor | None, device: torch.device):
    def build():
        from torch.nn.attention.flex_attention import create_block_mask

        seq_id = packing.seq_id.to(device)  # (T,)
        prompt = None if gen is None else ~gen  # (T,)

        def same_cell(b, h, q_idx, kv_idx):
            return seq_id[q_idx] == seq_id[kv_idx]

        def generative(b, h, q_idx, kv_idx):
            return (seq_id[q_idx] == seq_id[kv_idx]) & (prompt[kv_idx] | (q_idx == kv_idx))

        t = seq_id.shape[0]
        mask_mod = same_cell if gen is None else generative
        return create_block_mask(mask_mod, None, None, t, t, device=device)

    return packing.cached(("flex", id(gen)), build)


def _flex(q, k, v, packing: Packing, gen: torch.Tensor | None):
    block_mask = _flex_block_mask(packing, gen, q.device)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, T, Dh)
    out = _flex_fn(q.device.type)(qh, kh, vh, block_mask=block_mask)  # (1, H, T, Dh)
    return out.squeeze(0).transpose(0, 1)  # (T, H, Dh)


def _flash(q, k, v, packing: Packing, dropout_p: float):  # pragma: no cover - needs a GPU
    from flash_attn import flash_attn_varlen_func

    max_len = max(packing.lengths)
    cu = packing.cu_seqlens.to(q.device)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p)
