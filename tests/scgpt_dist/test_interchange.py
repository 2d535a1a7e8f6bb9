"""Reference-scGPT interchange: import/export of checkpoints and numerical parity with the reference model.

The reference is `scgpt==0.2.4` (installed with --no-deps by `make install`); only its model module is loaded.
"""

import argparse
import json

import pytest
import torch

from data_ingest import keys
from data_ingest.vocab import GeneVocab
from scgpt_dist import interchange
from scgpt_dist.interchange import (
    InterchangeError,
    export_reference,
    import_reference,
    load_reference_state,
)
from scgpt_dist.model import reference
from scgpt_dist.model.reference import build_reference_model, reference_values
from scgpt_dist.train.checkpoint import load_consolidated

try:
    reference.load_reference_module()
    HAVE_REF = True
except ImportError:
    HAVE_REF = False

needs_ref = pytest.mark.skipif(
    not HAVE_REF, reason="reference scGPT not installed (make install adds it)"
)

N_GENES = 40
TOL = 1e-5


def _vocab() -> GeneVocab:
    # The released whole-human vocab puts the special tokens last; do the same so pad_id != 0 is exercised.
    genes = [f"G{i}" for i in range(N_GENES)] + list(keys.SPECIAL_TOKENS)
    return GeneVocab({g: i for i, g in enumerate(genes)})


def _args(**kw) -> dict:
    """A tiny args.json in the reference's names (released whole-human: 12 x 512-d, 8 heads)."""
    args = {
        "embsize": 32,
        "nheads": 4,
        "d_hid": 48,
        "nlayers": 2,
        "n_layers_cls": 3,
        "n_cls": 5,
        "dropout": 0.2,
        "n_bins": 51,
        "pad_token": "<pad>",
        "pad_value": -2,
        "mask_value": -1,
        "max_seq_len": 1200,
        "mask_ratio": [0.25, 0.5, 0.75],
        "input_emb_style": "continuous",
        "cell_emb_style": "cls",
        "MVC": True,
        "explicit_zero_prob": False,
        "use_batch_labels": False,
        "num_batch_labels": None,
        "domain_spec_batchnorm": False,
        "do_dab": False,
        "fast_transformer": True,
    }
    args.update(kw)
    return args


def _tokens(vocab: GeneVocab, b=4, length=14, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    genes = torch.stack([torch.randperm(N_GENES, generator=g)[:length] for _ in range(b)])
    genes[:, 0] = vocab.cls_id
    values = torch.randint(0, 51, (b, length), generator=g).float()
    values[:, 0] = keys.PAD_VALUE
    values[:, 3] = keys.MASK_VALUE
    padding = torch.zeros(b, length, dtype=torch.bool)
    if pad:
        padding[1, 9:] = True
        padding[3, 5:] = True
    genes[padding] = vocab.pad_id
    values[padding] = keys.PAD_VALUE
    return genes, values, padding


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere, including BatchNorm running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)


def _write_reference_dir(path, args, vocab, style="flash", seed=0):
    """A reference checkpoint directory from a randomly initialized reference model."""
    ref = build_reference_model(args, vocab).eval()
    _randomize(ref, seed)
    state = ref.state_dict()
    if (
        style == "flash"
    ):  # what fast_transformer (flash-attn v1) runs save, e.g. the released models
        state = {
            k.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight").replace(
                "self_attn.in_proj_bias", "self_attn.Wqkv.bias"
            ): v
            for k, v in state.items()
        }
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "best_model.pt")
    (path / "args.json").write_text(json.dumps(args))
    vocab.save(path / "vocab.json")
    return ref


def _compare(ours, ref, vocab, args, pad=True, batch=None):
    """Max abs differences of cell embedding, GEP, GEPC (and zero probs) on real tokens."""
    genes, values, padding = _tokens(vocab, pad=pad)
    kw = {}
    if batch is not None:
        kw["batch_labels"] = batch
    with torch.no_grad():
        r = ref(
            genes,
            reference_values(values, ours.cfg),
            padding,
            MVC=ours.cfg.do_mvc,
            CLS=ours.cfg.n_cls > 0,
            **kw,
        )
        o = ours(genes, values, padding, batch)
    keep = ~padding
    diffs = {
        "cell_emb": (o["cell_emb"] - r["cell_emb"]).abs().max().item(),
        "gep": (o["gep"][keep] - r["mlm_output"][keep]).abs().max().item(),
    }
    if ours.cfg.do_mvc:
        diffs["gepc"] = (o["gepc"][keep] - r["mvc_output"][keep]).abs().max().item()
    if ours.cfg.explicit_zero_prob:
        diffs["gep_zero"] = (
            (o["gep_zero_prob"][keep] - r["mlm_zero_probs"][keep]).abs().max().item()
        )
        diffs["gepc_zero"] = (
            (o["gepc_zero_prob"][keep] - r["mvc_zero_probs"][keep]).abs().max().item()
        )
    if ours.cfg.do_dab:
        diffs["dar"] = (o["dar_logits"] - r["dab_output"]).abs().max().item()
    if ours.cfg.n_cls:
        diffs["cls"] = (o["cls_logits"] - r["cls_output"]).abs().max().item()
    return diffs


CASES = {
    "default-flash-keys": (_args(), "flash", True),
    "torch-in-proj-keys": (_args(), "torch", True),
    "batch-labels-zero-prob": (
        _args(use_batch_labels=True, num_batch_labels=3, explicit_zero_prob=True),
        "flash",
        True,
    ),
    "category-values": (
        _args(input_emb_style="category", pad_value=51, mask_value=52),
        "flash",
        True,
    ),
    "scaling-values": (_args(input_emb_style="scaling"), "flash", True),
    "avg-pool": (_args(cell_emb_style="avg-pool"), "flash", False),
    "w-pool": (_args(cell_emb_style="w-pool"), "flash", False),
    "dsbn-dab": (
        _args(domain_spec_batchnorm="dsbn", num_batch_labels=3, do_dab=True),
        "flash",
        True,
    ),
    "batchnorm": (_args(domain_spec_batchnorm="batchnorm"), "torch", True),
}


@needs_ref
@pytest.mark.parametrize("case", list(CASES))
def test_parity_both_ways(case, tmp_path):
    """Same args.json -> both models; reference weights into ours and ours back into the reference."""
    args, style, pad = CASES[case]
    vocab = _vocab()
    ref = _write_reference_dir(tmp_path / "ref", args, vocab, style)
    ours = load_consolidated(import_reference(tmp_path / "ref", tmp_path / "ours")).model
    # avg-pool / w-pool: the reference pools over padding too, so compare those on unpadded cells.
    needs_batch = args["use_batch_labels"] or args["domain_spec_batchnorm"] or args["do_dab"]
    batch = (
        torch.zeros(4, dtype=torch.long) + 1 if needs_batch else None
    )  # DSBN: one domain per batch
    diffs = _compare(ours, ref, vocab, args, pad=pad, batch=batch)
    assert max(diffs.values()) <= TOL, diffs

    # ours -> reference: export, load strictly into a fresh reference model built from the exported args.
    out = export_reference(tmp_path / "ours", tmp_path / "back", style=style)
    exported_args = json.loads((out / "args.json").read_text())
    ref2 = build_reference_model(exported_args, GeneVocab.load(out / "vocab.json")).eval()
    state = torch.load(out / "best_model.pt", weights_only=True)
    if style == "flash":
        state = interchange.ours_to_reference(interchange.reference_to_ours(state), "torch")
    ref2.load_state_dict(state, strict=True)
    diffs2 = _compare(ours, ref2, vocab, args, pad=pad, batch=batch)
    assert max(diffs2.values()) <= TOL, diffs2
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ref2.state_dict()[k], v, rtol=0, atol=0)


@needs_ref
def test_imported_config_and_vocab(tmp_path):
    args = _args(use_batch_labels=True, num_batch_labels=3)
    vocab = _vocab()
    _write_reference_dir(tmp_path / "ref", args, vocab)
    loaded = load_consolidated(import_reference(tmp_path / "ref", tmp_path / "ours"))
    m = loaded.config.model
    assert (m.d_model, m.n_heads, m.n_layers, m.d_hid, m.n_cls) == (32, 4, 2, 48, 5)
    assert m.use_batch_labels and m.n_batches == 3 and m.do_mvc
    assert loaded.config.objectives.mask_ratios == [0.25, 0.5, 0.75]
    assert loaded.config.data.tokenizer.max_seq_len == 1200
    assert loaded.vocab == vocab and loaded.vocab.pad_id == N_GENES
    assert loaded.meta["format"] == "scgpt-reference"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary directory left behind


def test_refuses_pickled_objects(tmp_path):
    # A whole pickled object (here an argparse.Namespace, as old training scripts saved) is not loaded.
    evil = {"encoder.embedding.weight": torch.zeros(2, 2), "args": argparse.Namespace(lr=1.0)}
    torch.save(evil, tmp_path / "m.pt")
    with pytest.raises(InterchangeError, match="refused"):
        load_reference_state(tmp_path / "m.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(InterchangeError, match="not a state dict"):
        load_reference_state(tmp_path / "list.pt")


def test_state_dict_wrappers_and_module_prefix(tmp_path):
    w = torch.arange(4.0).view(2, 2)
    torch.save({"model": {"module.encoder.embedding.weight": w}}, tmp_path / "m.pt")
    assert torch.equal(load_reference_state(tmp_path / "m.pt")["encoder.embedding.weight"], w)


def test_key_mapping_round_trip():
    state = {
        "transformer_encoder.layers.0.self_attn.in_proj_weight": torch.zeros(6, 2),
        "transformer_encoder.layers.0.self_attn.in_proj_bias": torch.zeros(6),
        "transformer_encoder.layers.11.self_attn.Wqkv.weight": torch.ones(6, 2),
        "decoder.fc.0.weight": torch.ones(2, 2),
    }
    ours = interchange.reference_to_ours(state)
    assert set(ours) == {
        "transformer_encoder.layers.0.self_attn.Wqkv.weight",
        "transformer_encoder.layers.0.self_attn.Wqkv.bias",
        "transformer_encoder.layers.11.self_attn.Wqkv.weight",
        "decoder.fc.0.weight",
    }
    torch_keys = interchange.ours_to_reference(ours, "torch")
    assert "transformer_encoder.layers.11.self_attn.in_proj_weight" in torch_keys
    assert interchange.ours_to_reference(ours, "flash").keys() == ours.keys()


@needs_ref
def test_unknown_and_missing_keys(tmp_path):
    vocab = _vocab()
    args = _args()
    _write_reference_dir(tmp_path / "ref", args, vocab)
    state = torch.load(tmp_path / "ref" / "best_model.pt", weights_only=True)
    state["flag_encoder.weight"] = torch.zeros(3, 32)
    torch.save(state, tmp_path / "ref" / "best_model.pt")
    with pytest.raises(InterchangeError, match="--drop-unknown"):
        import_reference(tmp_path / "ref", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
    import_reference(tmp_path / "ref", tmp_path / "ours", drop_unknown=True)
    del state["decoder.fc.0.weight"]
    torch.save(state, tmp_path / "ref" / "best_model.pt")
    with pytest.raises(InterchangeError, match="lacks parameters"):
        import_reference(tmp_path / "ref", tmp_path / "ours2", drop_unknown=True)


@needs_ref
def test_cli_round_trip(tmp_path, capsys):
    from jobs.interchange import main

    vocab = _vocab()
    _write_reference_dir(tmp_path / "ref", _args(), vocab, "flash")
    assert main(["import", "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    assert "wrote" in capsys.readouterr().out
    a = torch.load(tmp_path / "ref" / "best_model.pt", weights_only=True)
    b = torch.load(tmp_path / "back" / "best_model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
