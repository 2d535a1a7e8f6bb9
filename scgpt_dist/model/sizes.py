"""Named model sizes, in one place: configs (`model.size: demo`), the model benchmark (`--preset`) and the
scale ablation (`models: [{name: xs, size: xs}]`) refer to them by name. A size fills the transformer's
shape; any of those fields set beside it wins."""

from __future__ import annotations

SIZES: dict[str, dict[str, int]] = {
    "xs": dict(d_model=16, n_heads=2, n_layers=1, d_hid=32),
    "tiny": dict(d_model=32, n_heads=2, n_layers=2, d_hid=64),
    "demo": dict(d_model=64, n_heads=4, n_layers=3, d_hid=128),
    "small": dict(d_model=256, n_heads=8, n_layers=4, d_hid=512),
    "whole-human": dict(d_model=512, n_heads=8, n_layers=12, d_hid=512),
}
"""Shape of each named size. `tiny`: the tests and the CI learning run; `demo`: `make demo` and the learning
benchmark; `small`: the model benchmark's CPU default; `whole-human`: the scGPT whole-human model's shape
(12 layers, 512-d, 8 heads), the model benchmark's GPU preset; `xs`: the scale ablation's smallest."""


def size_fields(name: str) -> dict[str, int]:
    """The ModelConfig fields of size `name`; a clear error for an unknown one."""
    if name not in SIZES:
        raise ValueError(
            f"model.size={name!r} is not a named size; choose one of {', '.join(SIZES)}"
        )
    return dict(SIZES[name])
