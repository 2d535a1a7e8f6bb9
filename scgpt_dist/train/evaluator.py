"""The in-training evaluation: held-out GEP against its baselines and the embedding scores, on a fixed sample
(`EvalConfig`); the training loop calls it at `eval.every` steps and hands its metrics to the callbacks."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from data_ingest import keys
from scgpt_dist.config import ExperimentConfig
from scgpt_dist.evaluate import embedding_scores, gap_closed, model_scores


class Evaluator:
    """Scores the model on a fixed held-out sample every `eval.every` steps (`EvalConfig`).

    Every rank scores its equal share of the sample (a collective under ZeRO-3, so all ranks call `run` at
    the same steps); squared errors are summed and embeddings gathered over ranks, and rank 0 logs
    `eval/gep_mse`, `eval/gep_gap_closed`, the baselines `eval/baseline_*`, `eval/knn_type`,
    `eval/knn_batch` and `eval/mean_cosine` through the callbacks' `on_eval` (MLflow commits them with the
    next checkpoint, like every metric)."""

    def __init__(self, cfg: ExperimentConfig, eval_set: dict, rank: int, world: int, pad_id: int):
        self.every = cfg.eval.every
        self.k = cfg.eval.knn_k
        self.seed = cfg.eval.seed
        self.generative = cfg.objectives.generative
        self.pad_id = pad_id
        self.rank, self.world = rank, world
        self.baselines = eval_set["baselines"]
        self.has_labels = eval_set["has_labels"]
        table = eval_set["table"]
        share = table.num_rows // world
        self.table = table.slice(rank * share, share)

    def due(self, step: int, last_step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last_step)

    def run(self, model, step: int) -> dict[str, float] | None:
        """The metrics on rank 0, None on the other ranks (a collective: every rank calls it)."""
        se, n, emb = model_scores(model, self.pad_id, self.table, generative=self.generative)
        meta = np.stack(
            [self.table[keys.LABEL].to_numpy(), self.table[keys.BATCH].to_numpy()], axis=1
        ).astype(np.float32)
        local = torch.from_numpy(np.concatenate([emb, meta], axis=1))
        sums = torch.tensor([se, n], dtype=torch.float64)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(sums)
            parts = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local)
            local = torch.cat(parts)
        if self.rank != 0:
            return None
        everything = local.numpy()
        emb, labels, batches = everything[:, :-2], everything[:, -2], everything[:, -1]
        mse = float(sums[0] / max(float(sums[1]), 1.0))
        metrics = {"eval/gep_mse": mse}
        metrics.update({f"eval/baseline_{k}": v for k, v in self.baselines.items()})
        closed = gap_closed(mse, self.baselines)
        if closed is not None:
            metrics["eval/gep_gap_closed"] = closed
        scores = embedding_scores(
            emb, labels if self.has_labels else None, batches, k=self.k, seed=self.seed
        )
        metrics.update({f"eval/{k}": v for k, v in scores.items()})
        return metrics
