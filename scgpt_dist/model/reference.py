"""The reference scGPT model (the `scgpt` package's `TransformerModel`) for side-by-side checks and the model
benchmark: loaded without the package's `__init__` (whose dependencies do not install) and built from a
reference `args.json`. Imports torch only, like the rest of the model package, so `jobs.bench model` builds
both sides on a machine with nothing but torch (and the `scgpt` package's files, `pip install --no-deps`).
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from data_ingest import keys
from scgpt_dist.model.config import ModelConfig


def arg_of(args: dict[str, Any], *names: str, default: Any = None) -> Any:
    """The first of `names` set in a reference `args.json` (its runs spell some settings two ways)."""
    for name in names:
        if name in args and args[name] is not None:
            return args[name]
    return default


REFERENCE_PACKAGE = "scgpt"
_REF_ALIAS = "_scgpt_reference"


def load_reference_module() -> types.ModuleType:
    """The reference `scgpt/model/model.py` as a module, without importing `scgpt/__init__.py` (whose
    dependencies do not install). Raises ImportError when the package is not installed."""
    name = f"{_REF_ALIAS}.model.model"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(REFERENCE_PACKAGE)  # does not run the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the reference scGPT is not installed; `pip install --no-deps scgpt==0.2.4` (make install does)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    for pkg, path in ((_REF_ALIAS, root), (f"{_REF_ALIAS}.model", root / "model")):
        if pkg not in sys.modules:
            stub = types.ModuleType(pkg)
            stub.__path__ = [str(path)]
            sys.modules[pkg] = stub
    mod_spec = importlib.util.spec_from_file_location(name, root / "model" / "model.py")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flash_attn is not installed")
        mod_spec.loader.exec_module(module)
    return module


def build_reference_model(args: dict[str, Any], vocab) -> torch.nn.Module:
    """A reference `TransformerModel` built from `args.json` (on CPU: nn.TransformerEncoder) over `vocab`
    (a `GeneVocab`: its length and token -> id mapping)."""
    ref = load_reference_module()
    style = arg_of(args, "input_emb_style", default="continuous")
    n_bins = int(arg_of(args, "n_bins", default=51))
    bn = arg_of(args, "domain_spec_batchnorm", "DSBN", default=False)
    return ref.TransformerModel(
        ntoken=len(vocab),
        d_model=int(arg_of(args, "embsize", "d_model")),
        nhead=int(arg_of(args, "nheads", "nhead")),
        d_hid=int(args["d_hid"]),
        nlayers=int(arg_of(args, "nlayers", "n_layers")),
        nlayers_cls=int(arg_of(args, "n_layers_cls", default=3)),
        n_cls=int(arg_of(args, "n_cls", default=1)),
        vocab=vocab.to_dict(),
        dropout=float(arg_of(args, "dropout", default=0.2)),
        pad_token=arg_of(args, "pad_token", default=keys.PAD_TOKEN),
        pad_value=int(arg_of(args, "pad_value", default=keys.PAD_VALUE)),
        do_mvc=bool(arg_of(args, "MVC", "do_mvc", default=False)),
        do_dab=bool(arg_of(args, "do_dab", default=False)),
        use_batch_labels=bool(arg_of(args, "use_batch_labels", default=False)),
        num_batch_labels=arg_of(args, "num_batch_labels"),
        domain_spec_batchnorm=bn,
        input_emb_style=style,
        n_input_bins=n_bins + 2 if style == "category" else None,
        cell_emb_style=arg_of(args, "cell_emb_style", default="cls"),
        explicit_zero_prob=bool(arg_of(args, "explicit_zero_prob", default=False)),
        use_fast_transformer=False,
    )


def reference_values(values: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Our value codes as the reference model expects them (category style: pad n_bins, mask n_bins+1)."""
    if cfg.input_emb_style != "category":
        return values
    out = values.masked_fill(values == keys.PAD_VALUE, cfg.n_bins)
    return out.masked_fill(values == keys.MASK_VALUE, cfg.n_bins + 1)
