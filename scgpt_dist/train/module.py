"""The train module: model, DeepSpeed engine (optimizer, ZeRO, precision, schedule) and one step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import deepspeed
import torch

from data_ingest import keys
from data_ingest.vocab import GeneVocab
from scgpt_dist.config import ExperimentConfig, ObjectiveConfig, TrainConfig
from scgpt_dist.model.collate import Batch, draw_mask_ratio, mask_values
from scgpt_dist.model.losses import total_loss
from scgpt_dist.model.transformer import build_model


def deepspeed_config(cfg: TrainConfig, world_size: int, n_params: int | None = None) -> dict:
    """DeepSpeed config for this run. The global batch is micro x accumulation x world size.

    With `n_params`, ZeRO's communication buckets are sized to the model: DeepSpeed's defaults (5e8
    elements, 2 GiB in fp32 per bucket) dwarf a small model's own memory under ZeRO-3.
    """
    accum = cfg.resolved_grad_accum()
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.micro_batch_size * accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: DeepSpeed's fused Adam is CUDA-only; torch's runs everywhere.
            "params": {
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
                "betas": [0.9, 0.98],
                "eps": 1e-8,
                "torch_adam": not cfg.use_gpu,
            },
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if n_params is not None:
        bucket = -(-int(min(5e8, max(1e6, n_params))) // 1024) * 1024  # NCCL-alignment multiple
        ds["zero_optimization"].update(
            {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        )
        if cfg.zero_stage == 3:
            ds["zero_optimization"]["stage3_prefetch_bucket_size"] = bucket
    if cfg.offload_optimizer:
        if cfg.zero_stage < 1:
            raise ValueError("train.offload_optimizer needs train.zero_stage >= 1")
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return ds


def lr_lambda(cfg: TrainConfig):
    """Multiplier of `lr` at a step: linear warmup, then `cfg.lr_schedule` (cosine / constant / wsd)."""
    floor = cfg.min_lr_ratio

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        if cfg.lr_schedule == "constant":
            return 1.0
        if cfg.lr_schedule == "wsd":
            decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
            start = max(cfg.warmup_steps, cfg.max_steps - decay_steps)
            progress = min(1.0, max(0, step - start) / max(1, cfg.max_steps - start))
            return 1.0 - (1.0 - floor) * progress
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Optimizer parameter groups: weight decay on linear-layer matrices only, unless
    `cfg.weight_decay_all` (LayerNorm weights, biases and embedding tables are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.weight_decay_all:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, keep = [], []
    for p in params:
        (decay if p.dim() >= 2 and id(p) not in tables else keep).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    return groups


def cell_prompt_inputs(
    values: torch.Tensor, padding: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input values and unknown-gene flags, both (B, L), of the cell-prompt pass: every real gene but
    `<cls>` is unknown (its value masked); the prompt is the `<cls>` position, fed the cell embedding."""
    gen = ~padding.bool()  # (B, L)
    gen[:, 0] = False
    return values.masked_fill(gen, float(keys.MASK_VALUE)), gen


def hidden_queries(
    genes: torch.Tensor,
    values: torch.Tensor,
    hidden: torch.Tensor,
    n_tokens: int,
    negatives: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GEPC-hidden's queries: each cell's hidden genes with their values, then about `negatives` x as many
    genes drawn uniformly from the vocabulary's genes (ids >= len(SPECIAL_TOKENS)) that are not in the
    cell's input, with value 0. genes, values, hidden: (B, L). Returns query genes (pad id 0 where
    unused), targets and a validity mask, each (B, L + K)."""
    b = genes.shape[0]
    n_special = len(keys.SPECIAL_TOKENS)
    n_hidden = hidden.sum(1)  # (B,)
    k = int(math.ceil(float(n_hidden.max()) * negatives)) if b else 0
    neg = torch.randint(n_special, n_tokens, (b, k), generator=generator)  # (B, K)
    # A drawn gene that is in the cell's input is not a negative; each cell keeps its first n x ratio.
    in_cell = (neg[:, :, None] == genes[:, None, :]).any(-1)  # (B, K)
    wanted = torch.arange(k)[None, :] < (n_hidden.float() * negatives).ceil()[:, None]
    neg_ok = wanted & ~in_cell
    q_genes = torch.cat([genes.masked_fill(~hidden, 0), neg.masked_fill(~neg_ok, 0)], 1)
    q_target = torch.cat([values.masked_fill(~hidden, 0.0), torch.zeros(b, k)], 1)
    return q_genes, q_target, torch.cat([hidden, neg_ok], 1)


def split_views(
    model: torch.nn.Module,
    batch: Batch,
    mask: torch.Tensor,
    optional: dict[str, torch.Tensor],
    device: torch.device | str,
    both: bool = True,
    query_genes: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, torch.Tensor]]:
    """Passes over disjoint halves of each cell's genes: its unmasked genes, and (with `both`) its
    GEP-masked genes (`mask`, (B, L)); each pass sees only its own genes with their true values (the other
    half is padding) and `<cls>`. `query_genes` (B, Q) go to the first pass (GEPC-hidden). Returns the
    model outputs of each pass. Used by CCE (`objectives.cce_view: split`) and GEPC-hidden."""
    genes, values = batch.genes.to(device), batch.values.to(device, dtype)
    padding, cells = batch.padding.to(device), batch.batch.to(device)
    mask = mask.to(device)
    real = ~padding
    real[:, 0] = False  # <cls> is in both views
    halves = (real & ~mask, real & mask)[: 2 if both else 1]
    outs = []
    for i, half in enumerate(halves):
        hide = padding | (real & ~half)  # (B, L) the other half becomes padding
        q = query_genes.to(device) if query_genes is not None and i == 0 else None
        outs.append(model(genes, values, hide, cells, query_genes=q, **optional))
    return outs


def compute_loss(
    model: torch.nn.Module,
    batch: Batch,
    values_in: torch.Tensor,
    mask: torch.Tensor,
    obj: ObjectiveConfig,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    gather: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward pass(es) of one micro-batch and the weighted objectives (loss, detached parts).

    gather: CCE takes its negatives from every data-parallel rank (see `losses.total_loss`).

    values_in: (B, L) input values with the GEP-masked positions `mask` (B, L) set to the mask value. With
    `obj.generative` the masked genes are unknown genes (generative attention mask); with
    `obj.gen_cell_prompt` a second pass generates every gene from the first pass's cell embedding.
    """
    dev = device
    inner = getattr(model, "module", model)  # the model inside a DeepSpeed engine
    optional = {
        k: v.to(dev)
        for k, v in {"modality": batch.modality, "perturbation": batch.perturbation}.items()
        if v is not None
    }
    genes, padding, cells = batch.genes.to(dev), batch.padding.to(dev), batch.batch.to(dev)
    out = model(
        genes,
        values_in.to(dev),
        padding,
        cells,
        gen_mask=mask.to(dev) if obj.generative else None,
        cce=obj.cce > 0 and obj.cce_view == "dropout",
        **optional,
    )
    split = obj.cce > 0 and obj.cce_view == "split"
    if split or obj.gepc_hidden > 0:
        query = None
        if obj.gepc_hidden > 0:
            n_tokens = inner.encoder.embedding.num_embeddings
            q_genes, q_target, q_mask = hidden_queries(
                batch.genes, batch.values, mask & ~batch.padding, n_tokens,
                obj.gepc_hidden_negatives, generator or torch.Generator().manual_seed(0),
            )  # fmt: skip
            query = q_genes
            out["gepc_query_target"], out["gepc_query_mask"] = q_target.to(dev), q_mask.to(dev)
        views = split_views(
            model, batch, mask, optional, dev, both=split, query_genes=query, dtype=values_in.dtype
        )
        if query is not None:
            out.update({k: v for k, v in views[0].items() if k.startswith("gepc_query")})
        if split:
            out["cce_view1"], out["cce_view2"] = views[0]["cell_emb"], views[1]["cell_emb"]
    if obj.cce > 0 and obj.cce_view == "thinned":
        if batch.views is None:
            raise ValueError(
                "objectives.cce_view=thinned needs records with thinned views: set "
                "data.tokenizer.thinned_view (e.g. 0.5)"
            )
        for i, v in enumerate(batch.views, start=1):
            values = v.values.to(values_in.dtype).to(dev)
            out[f"cce_view{i}"] = model(v.genes.to(dev), values, v.padding.to(dev), cells)[
                "cell_emb"
            ]
    prompt_mask = None
    if obj.generative and obj.gen_cell_prompt:
        prompt_values, prompt_mask = cell_prompt_inputs(batch.values.to(dev), padding)
        second = model(
            genes,
            prompt_values.to(values_in.dtype),
            padding,
            cells,
            gen_mask=prompt_mask,
            cell_prompt=out["cell_emb"],
            **optional,
        )
        out["cell_prompt_gep"] = second["gep"]  # (B, L)
    if obj.cce > 0 and inner.cfg.cce_batch_offset:  # each view plus its batch's learned vector
        if "cce_view1" not in out:
            out["cce_view1"], out["cce_view2"] = out["cell_emb"], out["cell_emb2"]
        offset = inner.cce_batch_offset(cells)  # (B, D)
        out["cce_view1"], out["cce_view2"] = out["cce_view1"] + offset, out["cce_view2"] + offset
    out = {k: v.float() for k, v in out.items()}
    return total_loss(
        out,
        batch.values.to(dev),
        mask.to(dev),
        obj,
        batch=cells,
        labels=batch.label.to(dev),
        cell_prompt_mask=prompt_mask,
        gather=gather,
    )


@dataclass
class StepOutput:
    loss: float
    parts: dict[str, float]
    n_tokens: int
    n_cells: int
    boundary: bool
    """True when this micro-step completed an optimizer step."""


class TrainModule:
    """Owns the model and DeepSpeed engine; `micro_step` runs forward, backward and (on boundaries) step."""

    def __init__(self, cfg: ExperimentConfig, vocab: GeneVocab, world_size: int, rank: int):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, len(vocab), vocab.pad_id)
        model.transformer_encoder.gradient_checkpointing = cfg.train.activation_checkpointing
        self.pad_id = vocab.pad_id
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.train),
            config=deepspeed_config(
                cfg.train, world_size, sum(p.numel() for p in model.parameters())
            ),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train)),
        )
        self.device = self.engine.device
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)

    def micro_step(self, batch: Batch, position: tuple[int, int]) -> StepOutput:
        """Forward + backward on one micro-batch; `position` (epoch, batch index) seeds the GEP mask."""
        key = (self.cfg.train.seed, self.rank, *position)
        gen = torch.Generator().manual_seed(hash(key) % 2**63)
        obj = self.cfg.objectives
        ratio = draw_mask_ratio(obj.mask_ratio, obj.mask_ratios, gen)
        masked, mask = mask_values(batch.values, ratio, gen)
        values_in = masked.to(self.device)
        if self._dtype is not None:
            values_in = values_in.to(self._dtype)
        loss, parts = compute_loss(
            self.engine, batch, values_in, mask, obj, self.device, generator=gen,
            gather=obj.cce_gather and self.world_size > 1,
        )  # fmt: skip
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        return StepOutput(
            loss=float(loss.detach()),
            parts={k: float(v) for k, v in parts.items()},
            n_tokens=batch.n_tokens,
            n_cells=len(batch.genes),
            boundary=boundary,
        )

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, path: str, client_state: dict) -> None:
        self.engine.save_checkpoint(path, tag="ds", client_state=client_state)

    def load(self, path: str) -> dict:
        _, client_state = self.engine.load_checkpoint(path, tag="ds")
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        return client_state
