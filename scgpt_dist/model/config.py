"""The model's configuration: every choice the transformer and its heads are built from. No dependency
beyond the standard library, so the model package runs where only torch is installed."""

from __future__ import annotations

from dataclasses import dataclass, field

from scgpt_dist.model.sizes import size_fields

INPUT_EMB_STYLES = ("continuous", "category", "scaling")
INIT_STYLES = ("small", "reference", "torch")
CELL_EMB_STYLES = ("cls", "avg-pool", "w-pool")
BATCHNORM_STYLES = ("none", "dsbn", "batchnorm")


@dataclass
class ModelConfig:
    """scGPT transformer and its heads. Field names follow the reference `TransformerModel` arguments."""

    size: str | None = None
    """A named size (`scgpt_dist.model.sizes`: xs, tiny, demo, small, whole-human) that sets d_model,
    n_heads, n_layers and d_hid where a config file or override does not set them itself."""
    d_model: int = 128
    """Embedding width D."""
    n_heads: int = 4
    n_layers: int = 4
    d_hid: int = 256
    """Feed-forward hidden width."""
    dropout: float = 0.1
    norm_first: bool = False
    """Pre-norm blocks (LayerNorm before attention and MLP, a final LayerNorm after the last block), as
    most transformers since GPT-2; False is the scGPT reference's post-norm block."""
    n_bins: int = 51
    """Value bins (must equal data.tokenizer.n_bins)."""
    max_value: float = 512.0
    """Continuous value encoder clamps inputs at this value (scGPT reference)."""
    input_emb_style: str = "category"
    """Value embedding: `continuous` (MLP on the bin id), `category` (one embedding per bin; the pad and mask
    codes get their own rows n_bins and n_bins+1) or `scaling` (gene embedding times the value)."""
    init: str = "small"
    """Initial weights: `small` (the gene, value and batch / modality tables U(-0.1, 0.1): the LayerNorm
    after each table gives the same output scale, but Adam's steps move them ~17x faster, relative to
    their size, than from N(0, 1)), `reference` (the scGPT reference's `init_weights`: the gene embedding
    only) or `torch` (PyTorch's defaults)."""
    cell_emb_style: str = "cls"
    """Cell embedding: `cls` (the `<cls>` output), `avg-pool` (mean over the cell's tokens) or `w-pool`
    (value-weighted sum, L2-normalized)."""
    use_batch_labels: bool = True
    """Add a batch embedding to the cell representation used by the decoders."""
    n_batches: int = 0
    """Batch categories; 0 = filled in from the data."""
    domain_spec_batchnorm: str = "none"
    """Normalize input embeddings: `none`, `dsbn` (one BatchNorm per batch label) or `batchnorm`."""
    use_modality: bool = False
    """Add a per-cell modality embedding (RNA / ATAC / protein) to every token (condition token)."""
    n_modalities: int = 3
    """Modality categories (data_ingest.keys.MODALITY_*)."""
    use_perturbation: bool = False
    """Add a per-gene perturbation-flag embedding (0 = not perturbed, 1 = perturbed, 2 = pad)."""
    do_mvc: bool = True
    """Build the GEPC / MVC decoder (value prediction from the cell embedding)."""
    explicit_zero_prob: bool = False
    """Decoders also predict each gene's probability of a non-zero value (Bernoulli)."""
    n_cls: int = 0
    """Cell-type classes for the CLS head; 0 = no classification head."""
    nlayers_cls: int = 3
    """Layers of the CLS head (reference default)."""
    do_dab: bool = False
    """Build the gradient-reversal batch discriminator (DAR objective); needs n_batches."""
    cce_batch_offset: bool = False
    """CCE compares each view's cell embedding plus a learned vector of its batch (one per batch, zero at
    init), not the embedding alone: the contrast can tell datasets apart through that vector, so the cell
    embedding need not carry the batch to do so (as the GEPC decoder reads the batch from its own input
    rather than from `<cls>`). Where batches share their cell types (our census) the dataset then leaves
    the embedding (batch kNN 0.64 -> 0.43, type kNN 0.99 -> 1.00); where their type mixes differ (Splat) the
    vector takes over much of the type too (kNN 0.92 -> 0.51), so presets leave it off (docs/learning.md)."""
    attention: str = "sdpa"
    """Attention backend: `sdpa` (PyTorch, padded batch with a boolean mask), `varlen` (packed tokens, one
    call per group of equal-length cells: padding costs nothing), `flash` (flash-attn 2 varlen, GPU; falls
    back to sdpa) or `flex` (FlexAttention with a block mask; without dropout, and on CPU inference only:
    other calls use varlen)."""

    @classmethod
    def of_size(cls, size: str, **fields) -> ModelConfig:
        """The config of a named size, with `fields` set on top (e.g. `ModelConfig.of_size("demo", dropout=0)`)."""
        return cls(**cls.expand_preset({"size": size, **fields}))

    @staticmethod
    def expand_preset(data: dict) -> dict:
        """The config loader's hook: a mapping with `size` gets that size's fields under its own."""
        return {**size_fields(data["size"]), **data} if data.get("size") else data

    def __post_init__(self) -> None:
        if self.size is not None:
            size_fields(self.size)  # a clear error for an unknown name
        for name, value, choices in (
            ("input_emb_style", self.input_emb_style, INPUT_EMB_STYLES),
            ("init", self.init, INIT_STYLES),
            ("cell_emb_style", self.cell_emb_style, CELL_EMB_STYLES),
            ("domain_spec_batchnorm", self.domain_spec_batchnorm, BATCHNORM_STYLES),
        ):
            if value not in choices:
                raise ValueError(f"model.{name}={value!r}; choose one of {choices}")


CCE_VIEWS = ("dropout", "split", "thinned")
"""`objectives.cce_view` choices."""


@dataclass
class ObjectiveConfig:
    """Pretraining objectives and their weights (0 disables one)."""

    mask_ratio: float = 0.4
    """Fraction of non-`<cls>` genes whose value is masked for GEP."""
    mask_ratios: list[float] = field(default_factory=list)
    """Mask-ratio schedule (reference: [0.25, 0.5, 0.75]): each micro-batch draws one; empty = mask_ratio."""
    generative: bool = False
    """Generative attention mask: masked (unknown) genes attend to the known genes and themselves only."""
    gen_cell_prompt: float = 0.0
    """Cell-prompt generation (needs `generative`): a second pass where the gene-prompt pass's cell
    embedding is the `<cls>` input and every other gene is unknown; masked MSE of all their values."""
    gep: float = 1.0
    """Gene expression prediction: masked value regression."""
    gepc: float = 1.0
    """GEPC / MVC: predict masked values from the cell embedding."""
    gep_zero: float = 0.0
    """Bernoulli NLL of GEP's zero-probability head (needs model.explicit_zero_prob)."""
    gepc_zero: float = 0.0
    """Bernoulli NLL of GEPC's zero-probability head (needs model.explicit_zero_prob)."""
    gepc_hidden: float = 0.0
    """GEPC on genes the cell embedding never saw (needs model.do_mvc): a second pass encodes only the
    cell's unmasked genes, and GEPC predicts from its `<cls>` the values of the masked genes (which that
    pass does not see at all, not even their identities) and of genes outside the cell's input (value 0).
    The embedding must then carry which genes the cell expresses: its type and state, also where types
    differ by many small shifts that no single masked value shows. Experimental: on the Splat simulation it
    did not make the embedding learn cell types (docs/learning.md section 4)."""
    gepc_hidden_target: str = "value"
    """What GEPC-hidden predicts of each queried gene: `value` (masked MSE of its bin, 0 outside the
    input) or `presence` (Bernoulli NLL of being in the cell's input, from GEPC's explicit-zero head: needs
    model.explicit_zero_prob)."""
    gepc_hidden_negatives: float = 1.0
    """Genes outside a cell's input queried by `gepc_hidden`, per masked gene (drawn uniformly from the
    vocabulary's genes)."""
    ecs: float = 0.0
    """Elastic cell similarity (pushes cosine similarities of different cells below the threshold)."""
    ecs_threshold: float = 0.3
    """ECS similarity threshold (reference default)."""
    dar: float = 0.0
    """Domain adaptation by reverse backprop: batch discriminator on the cell embedding (model.do_dab)."""
    cls: float = 0.0
    """Cell-type classification cross-entropy (model.n_cls > 0; cells with label -1 are ignored)."""
    cce: float = 0.0
    """Contrastive cell embedding: two dropout views of each cell (needs dropout > 0)."""
    cce_temp: float = 0.5
    """CCE cosine-similarity temperature (reference value)."""
    cce_view: str = "dropout"
    """How CCE makes a cell's two views. `dropout` (SimCSE, as the reference): the same input twice with
    different dropout. `split`: two disjoint halves of the cell's genes, the GEP-masked genes and the others,
    each with its true values; the two embeddings can only agree through what the gene sets share (cell type,
    state, batch), not through the identity of the input. Costs the same as `dropout` (one extra pass over
    the tokens). Experimental: on the Splat simulation the halves were matched by something other than the
    cell type (docs/learning.md section 4). `thinned`: two more records of the cell, each
    made from its counts thinned binomially (`tokenizer.thinned_view`) and tokenised afresh (its own bins and
    top genes), contrasted in both directions: the views share the cell's expression profile, not all of its
    counting noise or its bins (two extra passes over the tokens; the objective that finds cell types on the
    Splat simulation, docs/learning.md section 4)."""
    cce_gather: bool = True
    """With several data-parallel ranks, contrast each rank's cells against the views of the whole global
    batch (a differentiable all-gather), as the reference gathers its CCE embeddings; false contrasts each
    rank's micro-batch alone (fewer negatives, no collective)."""

    def __post_init__(self) -> None:
        if self.gepc_hidden_target not in ("value", "presence"):
            raise ValueError(
                f"objectives.gepc_hidden_target={self.gepc_hidden_target!r}; use value or presence"
            )
        if self.cce_view not in CCE_VIEWS:
            raise ValueError(
                f"objectives.cce_view={self.cce_view!r} is not one of {', '.join(CCE_VIEWS)}"
            )
        if self.gen_cell_prompt and not self.generative:
            raise ValueError(
                "objectives.gen_cell_prompt > 0 needs objectives.generative=true (the generative mask); "
                "set it or objectives.gen_cell_prompt=0"
            )
