"""Interchange with the reference scGPT (the `scgpt` package / bowang-lab repository).

A reference checkpoint directory holds `best_model.pt` (a state dict of `scgpt.model.TransformerModel`),
`args.json` (the run's arguments) and `vocab.json`. `import_reference` turns one into our consolidated model
directory (`model.safetensors` + `config.yaml` + `vocab.json` + `meta.json`, written atomically);
`export_reference` writes ours back in the reference layout.

Key mapping: our parameter names are the reference's, except the attention input projection. The reference
saves it as flash-attn v1 `self_attn.Wqkv.{weight,bias}` (runs with `fast_transformer`, e.g. the released
whole-human model) or PyTorch `self_attn.in_proj_{weight,bias}` (runs without); both are q, k, v stacked along
the output dimension with heads inside, which is our `Wqkv` layout, so the mapping is a rename.

`best_model.pt` is read with `torch.load(weights_only=True)`: nothing is unpickled beyond tensors and plain
containers, and anything else is refused.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from data_ingest import keys
from data_ingest.atomic import atomic_directory
from data_ingest.vocab import GeneVocab
from scgpt_dist.config import (
    ExperimentConfig,
    ModelConfig,
    ObjectiveConfig,
    saved_config,
    to_dict,
)
from scgpt_dist.model.reference import arg_of
from scgpt_dist.model.transformer import build_model

log = logging.getLogger(__name__)

REF_WEIGHTS = "best_model.pt"
REF_ARGS = "args.json"
REF_VOCAB = "vocab.json"
EXPORT_STYLES = ("flash", "torch")

_IN_PROJ = re.compile(r"^(transformer_encoder\.layers\.\d+\.self_attn\.)in_proj_(weight|bias)$")
_WQKV = re.compile(r"^(transformer_encoder\.layers\.\d+\.self_attn\.)Wqkv\.(weight|bias)$")


class InterchangeError(ValueError):
    """A reference checkpoint (or export request) we cannot use, with what to do about it."""


# ----------------------------------------------------------------------------------------------- reading


def load_reference_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A reference `best_model.pt` as a flat state dict, loaded with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference weights at {path}; expected {REF_WEIGHTS}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InterchangeError(
            f"{path} holds Python objects beyond tensors and plain containers, so it is refused: loading "
            "it would run arbitrary code. Re-save only the state dict from a trusted environment: "
            "`torch.save(model.state_dict(), 'best_model.pt')`"
        ) from err
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise InterchangeError(
            f"{path} is not a state dict (a mapping of parameter names to tensors); save the model with "
            "`torch.save(model.state_dict(), path)`"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def reference_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename reference keys (flash `Wqkv` or torch `in_proj_*`) to ours."""
    out = {}
    for k, v in state.items():
        m = _IN_PROJ.match(k)
        out[f"{m.group(1)}Wqkv.{m.group(2)}" if m else k] = v
    return out


def ours_to_reference(
    state: dict[str, torch.Tensor], style: str = "flash"
) -> dict[str, torch.Tensor]:
    """Rename our keys to the reference's: `flash` keeps `Wqkv` (fast_transformer runs, the released
    checkpoints), `torch` writes `in_proj_*` (nn.TransformerEncoder runs)."""
    if style not in EXPORT_STYLES:
        raise InterchangeError(f"export style {style!r}; choose one of {EXPORT_STYLES}")
    out = {}
    for k, v in state.items():
        m = _WQKV.match(k)
        out[f"{m.group(1)}in_proj_{m.group(2)}" if m and style == "torch" else k] = v
    return out


def model_config_from_reference(
    args: dict[str, Any], state: dict[str, torch.Tensor]
) -> ModelConfig:
    """Our ModelConfig for a reference model: structure from the weights, the rest from `args.json`."""
    n_layers = len({k.split(".")[2] for k in state if k.startswith("transformer_encoder.layers.")})
    if "encoder.embedding.weight" not in state or n_layers == 0:
        raise InterchangeError(
            "the state dict lacks `encoder.embedding.weight` or transformer layers; it is not a reference "
            "scGPT TransformerModel checkpoint"
        )
    d_model = state["encoder.embedding.weight"].shape[1]
    n_heads = arg_of(args, "nheads", "nhead", "n_heads")
    if n_heads is None:
        raise InterchangeError(
            "args.json lacks `nheads`; the number of attention heads cannot be read from the weights"
        )
    if "value_encoder.linear1.weight" in state:
        style = "continuous"
    elif "value_encoder.embedding.weight" in state:
        style = "category"
    else:
        style = "scaling"
    n_bins = int(arg_of(args, "n_bins", default=51))
    if style == "category" and state["value_encoder.embedding.weight"].shape[0] != n_bins + 2:
        raise InterchangeError(
            f"category value embedding has {state['value_encoder.embedding.weight'].shape[0]} rows; "
            f"expected n_bins + 2 = {n_bins + 2} (bins, pad, mask)"
        )
    use_batch = "batch_encoder.embedding.weight" in state
    if "dsbn.bns.0.running_mean" in state:
        bn_style = "dsbn"
        n_batches = len({k.split(".")[2] for k in state if k.startswith("dsbn.bns.")})
    elif "bn.running_mean" in state:
        bn_style, n_batches = "batchnorm", 0
    else:
        bn_style, n_batches = "none", 0
    if use_batch:
        n_batches = state["batch_encoder.embedding.weight"].shape[0]
    do_dab = "grad_reverse_discriminator.out_layer.weight" in state
    if do_dab:
        n_batches = state["grad_reverse_discriminator.out_layer.weight"].shape[0]
    n_cls = (
        state["cls_decoder.out_layer.weight"].shape[0]
        if "cls_decoder.out_layer.weight" in state
        else 0
    )
    nlayers_cls = (
        1 + len({k.split(".")[2] for k in state if k.startswith("cls_decoder._decoder.")}) // 2
    )
    return ModelConfig(
        d_model=d_model,
        n_heads=int(n_heads),
        n_layers=n_layers,
        d_hid=state["transformer_encoder.layers.0.linear1.weight"].shape[0],
        dropout=float(arg_of(args, "dropout", default=0.2)),
        n_bins=n_bins,
        input_emb_style=style,
        cell_emb_style=str(arg_of(args, "cell_emb_style", default="cls")),
        use_batch_labels=use_batch,
        n_batches=n_batches,
        domain_spec_batchnorm=bn_style,
        do_mvc="mvc_decoder.W.weight" in state,
        explicit_zero_prob="decoder.zero_logit.0.weight" in state,
        n_cls=n_cls,
        nlayers_cls=nlayers_cls if n_cls else 3,
        do_dab=do_dab,
        init="reference",
    )


def experiment_config_from_reference(args: dict[str, Any], model: ModelConfig) -> ExperimentConfig:
    """An experiment config around an imported model (tokenizer and objectives from `args.json`)."""
    cfg = ExperimentConfig(model=model)
    cfg.data.tokenizer.n_bins = model.n_bins
    # The reference tokenizes a random subset of a cell's genes and breaks ties in binning at random.
    cfg.data.tokenizer.gene_selection = "random"
    cfg.data.tokenizer.tie_break = "random"
    if arg_of(args, "max_seq_len") is not None:
        cfg.data.tokenizer.max_seq_len = int(args["max_seq_len"])
    mask_ratio = arg_of(args, "mask_ratio")
    obj = ObjectiveConfig(gepc=1.0 if model.do_mvc else 0.0)
    if isinstance(mask_ratio, list):
        obj.mask_ratios = [float(r) for r in mask_ratio]
    elif mask_ratio is not None:
        obj.mask_ratio = float(mask_ratio)
    obj.generative = bool(arg_of(args, "USE_GENERATIVE_TRAINING", default=False))
    obj.ecs_threshold = float(arg_of(args, "ecs_thres", "ecs_threshold", default=obj.ecs_threshold))
    cfg.objectives = obj
    if arg_of(args, "lr") is not None:
        cfg.train.lr = float(args["lr"])
    return cfg


# ----------------------------------------------------------------------------------------------- writing


def _write_dir_atomic(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Write a directory through a temporary sibling and rename it into place."""
    with atomic_directory(out_dir) as tmp:
        write(tmp)
    return Path(out_dir)


def import_reference(ref_dir: str | Path, out_dir: str | Path, drop_unknown: bool = False) -> Path:
    """Reference checkpoint directory -> our consolidated model directory. Returns `out_dir`.

    Every reference tensor must land in our model unless `drop_unknown` (then unknown keys are logged and
    left out); every parameter of our model must come from the checkpoint.
    """
    from safetensors.torch import save_file

    ref_dir = Path(ref_dir)
    for name in (REF_WEIGHTS, REF_ARGS, REF_VOCAB):
        if not (ref_dir / name).is_file():
            raise FileNotFoundError(
                f"{ref_dir} lacks {name}; a reference scGPT checkpoint directory holds {REF_WEIGHTS}, "
                f"{REF_ARGS} and {REF_VOCAB}"
            )
    args = json.loads((ref_dir / REF_ARGS).read_text())
    vocab = GeneVocab.load(ref_dir / REF_VOCAB)
    state = reference_to_ours(load_reference_state(ref_dir / REF_WEIGHTS))
    model_cfg = model_config_from_reference(args, state)
    n_tokens = state["encoder.embedding.weight"].shape[0]
    if n_tokens != len(vocab):
        raise InterchangeError(
            f"the gene embedding has {n_tokens} rows but {ref_dir / REF_VOCAB} has {len(vocab)} tokens; "
            "pass the vocab.json the model was trained with"
        )
    model = build_model(model_cfg, n_tokens, vocab.pad_id)
    ours = model.state_dict()
    unknown = sorted(set(state) - set(ours))
    missing = sorted(set(ours) - set(state))
    if missing:
        raise InterchangeError(f"the checkpoint lacks parameters our model needs: {missing[:5]}")
    if unknown and not drop_unknown:
        raise InterchangeError(
            f"the checkpoint has {len(unknown)} tensors our model has no place for (e.g. {unknown[:5]}); "
            "pass --drop-unknown to import without them"
        )
    if unknown:
        log.warning("dropping %d reference tensors: %s", len(unknown), unknown[:10])
    for k, v in ours.items():
        if state[k].shape != v.shape:
            raise InterchangeError(
                f"{k}: checkpoint shape {tuple(state[k].shape)} != ours {tuple(v.shape)}"
            )
    weights = {
        k: state[k]
        .detach()
        .to(torch.float32 if state[k].is_floating_point() else state[k].dtype)
        .contiguous()
        for k in ours
    }
    cfg = experiment_config_from_reference(args, model_cfg)
    meta = {"imported_from": str(ref_dir.resolve()), "format": "scgpt-reference", "args": args}

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / keys.MODEL_FILE), metadata={"format": "pt"})
        (tmp / keys.CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        vocab.save(tmp / keys.VOCAB_FILE)
        (tmp / keys.META_FILE).write_text(json.dumps(meta, indent=1, default=str))

    return _write_dir_atomic(Path(out_dir), write)


def reference_args(cfg: ExperimentConfig) -> dict[str, Any]:
    """`args.json` for the reference: its argument names, enough to rebuild `TransformerModel`."""
    m = cfg.model
    mask = cfg.objectives.mask_ratios or cfg.objectives.mask_ratio
    return {
        "embsize": m.d_model,
        "nheads": m.n_heads,
        "d_hid": m.d_hid,
        "nlayers": m.n_layers,
        "n_layers_cls": m.nlayers_cls,
        "n_cls": max(m.n_cls, 1),
        "dropout": m.dropout,
        "n_bins": m.n_bins,
        "input_emb_style": m.input_emb_style,
        "cell_emb_style": m.cell_emb_style,
        "pad_token": keys.PAD_TOKEN,
        "pad_value": m.n_bins if m.input_emb_style == "category" else keys.PAD_VALUE,
        "mask_value": m.n_bins + 1 if m.input_emb_style == "category" else keys.MASK_VALUE,
        "max_seq_len": cfg.data.tokenizer.max_seq_len,
        "mask_ratio": mask,
        "MVC": m.do_mvc,
        "explicit_zero_prob": m.explicit_zero_prob,
        "use_batch_labels": m.use_batch_labels,
        "num_batch_labels": m.n_batches if m.n_batches else None,
        "domain_spec_batchnorm": {"none": False}.get(
            m.domain_spec_batchnorm, m.domain_spec_batchnorm
        ),
        "do_dab": m.do_dab,
        "USE_GENERATIVE_TRAINING": cfg.objectives.generative,
        "ecs_thres": cfg.objectives.ecs_threshold,
        "lr": cfg.train.lr,
        "fast_transformer": True,
    }


def export_reference(model_dir: str | Path, out_dir: str | Path, style: str = "flash") -> Path:
    """Our consolidated model directory -> a reference checkpoint directory (best_model.pt, args.json,
    vocab.json). The reference always builds a CLS head; a model without one exports with no CLS weights,
    so load it into the reference with `strict=False` or fine-tune the head there."""
    from safetensors.torch import load_file

    if style not in EXPORT_STYLES:
        raise InterchangeError(f"export style {style!r}; choose one of {EXPORT_STYLES}")
    model_dir = Path(model_dir)
    for name in (keys.MODEL_FILE, keys.CONFIG_FILE, keys.VOCAB_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(
                f"{model_dir} lacks {name}; pass a consolidated model directory (see python -m jobs.consolidate)"
            )

    cfg = saved_config(yaml.safe_load((model_dir / keys.CONFIG_FILE).read_text()))
    unsupported = [
        name
        for name, on in (
            ("use_modality", cfg.model.use_modality),
            ("use_perturbation", cfg.model.use_perturbation),
            ("norm_first (pre-norm blocks)", cfg.model.norm_first),
        )
        if on
    ]
    if unsupported:
        raise InterchangeError(
            f"the reference TransformerModel has no {', '.join(unsupported)}; this model cannot be exported"
        )
    state = ours_to_reference(load_file(str(model_dir / keys.MODEL_FILE)), style)
    args = reference_args(cfg)

    def write(tmp: Path) -> None:
        torch.save(state, tmp / REF_WEIGHTS)
        (tmp / REF_ARGS).write_text(json.dumps(args, indent=2))
        shutil.copy2(model_dir / keys.VOCAB_FILE, tmp / REF_VOCAB)

    return _write_dir_atomic(Path(out_dir), write)


# ----------------------------------------------------------------------------------------------- reference
