"""Distributed-training benchmark: DeepSpeed ZeRO 1/2/3 at world size 1 and 2 on Ray Train, side by side.

    python -m jobs.bench train [--stages 1 2 3] [--worlds 1 2] [--steps 8] [--d-model 256] [--vocab 20000]

For each (stage, world size) one Ray Train run (CPU, gloo) trains the same scGPT on the same synthetic token
batches and reports, per rank:
- tensor memory: bytes of every live torch tensor storage in the worker after the steps (parameters,
  gradients, optimizer state, fp32 partitions) — what ZeRO partitions;
- optimizer-state bytes alone (the Adam moments and fp32 master partitions held by the rank);
- checkpoint save and restore time (DeepSpeed `save_checkpoint` / `load_checkpoint`, all ranks) and size;
- throughput in tokens/s over the timed steps (after warm-up).
Nothing is timed in tests; run this by hand and put the table in the notes.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from data_ingest.vocab import GeneVocab
from scgpt_dist.config import ExperimentConfig, from_dict, load_config, to_dict
from scgpt_dist.model.collate import Batch
from scgpt_dist.train.module import TrainModule

TOKENS_PER_CELL = 256
MICRO_BATCH = 8


def _tensor_bytes() -> int:
    """Bytes of all distinct live tensor storages in this process."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # some tensor subclasses refuse storage access
            continue
    return sum(seen.values())


def _optimizer_bytes(optimizer) -> int:
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        for v in state.values():
            add(v)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for t in getattr(optimizer, name, None) or []:
            add(t)
    return sum(seen.values())


def _loop(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    cfg = from_dict(ExperimentConfig, config["cfg"])
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(config["vocab"])])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    module = TrainModule(cfg, vocab, world, rank)
    gen = torch.Generator().manual_seed(rank)

    def batch() -> Batch:
        genes = torch.randint(3, len(vocab), (MICRO_BATCH, TOKENS_PER_CELL), generator=gen)
        genes[:, 0] = vocab.cls_id
        values = torch.randint(1, 51, (MICRO_BATCH, TOKENS_PER_CELL), generator=gen).float()
        values[:, 0] = -2
        zeros = torch.zeros(MICRO_BATCH, dtype=torch.long)
        return Batch(
            genes=genes,
            values=values,
            padding=torch.zeros_like(genes, dtype=torch.bool),
            batch=zeros,
            label=zeros - 1,
            cell_id=torch.arange(MICRO_BATCH),
        )

    for i in range(2):  # warm-up
        module.micro_step(batch(), (0, i))
    dist.barrier()
    t0 = time.perf_counter()
    tokens = 0
    for i in range(config["steps"]):
        tokens += module.micro_step(batch(), (1, i)).n_tokens
    dist.barrier()
    elapsed = time.perf_counter() - t0
    gc.collect()
    mem, opt = _tensor_bytes(), _optimizer_bytes(module.optimizer)

    ckpt = Path(config["ckpt_root"])  # shared by the ranks (one machine)
    dist.barrier()
    t0 = time.perf_counter()
    module.save(str(ckpt), client_state={"train_state": {}})
    dist.barrier()
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    module.load(str(ckpt))
    dist.barrier()
    load_s = time.perf_counter() - t0

    rows: list = [None] * world
    dist.all_gather_object(rows, {"mem": mem, "opt": opt, "tokens": tokens, "elapsed": elapsed})
    # Results go to a file: in Train V2 a report without a checkpoint carries no metrics to the driver.
    if rank == 0:
        result = {
            "mem_per_rank": [r["mem"] for r in rows],
            "opt_per_rank": [r["opt"] for r in rows],
            "tokens_per_s": sum(r["tokens"] for r in rows) / max(r["elapsed"] for r in rows),
            "save_s": save_s,
            "load_s": load_s,
        }
        Path(config["result_file"]).write_text(json.dumps(result))


def run_one(stage: int, world: int, args, root: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = load_config(
        None,
        [
            f"model.d_model={args.d_model}",
            f"model.n_heads={args.heads}",
            f"model.n_layers={args.layers}",
            f"model.d_hid={2 * args.d_model}",
            "model.dropout=0.0",
            "model.n_batches=1",
            f"train.zero_stage={stage}",
            f"train.num_workers={world}",
            f"train.micro_batch_size={MICRO_BATCH}",
        ],
    )
    ckpt_root = root / f"ckpt_s{stage}_w{world}"
    trainer = TorchTrainer(
        _loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "vocab": args.vocab,
            "steps": args.steps,
            "ckpt_root": str(ckpt_root),
            "result_file": str(root / f"result_s{stage}_w{world}.json"),
        },
        scaling_config=ScalingConfig(num_workers=world, use_gpu=False),
        run_config=RunConfig(name=f"s{stage}w{world}", storage_path=str(root / "ray")),
    )
    trainer.fit()
    m = json.loads((root / f"result_s{stage}_w{world}.json").read_text())
    size = sum(p.stat().st_size for p in ckpt_root.rglob("*") if p.is_file())
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return {"stage": stage, "world": world, "ckpt_bytes": size, **m}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.bench train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--vocab", type=int, default=20000, help="genes in the vocabulary (embedding rows)"
    )
    args = parser.parse_args(argv)

    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=max(args.worlds) + 1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows = []
    try:
        for stage in args.stages:
            for world in args.worlds:
                rows.append(run_one(stage, world, args, root))
                print(f"done: ZeRO-{stage}, world {world}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(format_table(rows, args))
    return 0


def format_table(rows: list[dict], args) -> str:
    mib = 1 / 2**20
    base_tps = {r["stage"]: r["tokens_per_s"] for r in rows if r["world"] == 1}
    lines = [
        f"scGPT {args.layers} layers, {args.d_model}-d, vocab {args.vocab}, {TOKENS_PER_CELL} tokens x "
        f"{MICRO_BATCH} cells per rank, fp32 AdamW, CPU gloo, {args.steps} timed steps",
        "stage world  tensor MiB/rank  optim MiB/rank  ckpt MiB  save s  load s  tokens/s  vs world 1",
    ]
    for r in rows:
        mem = max(r["mem_per_rank"]) * mib
        opt = max(r["opt_per_rank"]) * mib
        rel = r["tokens_per_s"] / base_tps[r["stage"]] if r["stage"] in base_tps else float("nan")
        lines.append(
            f"{r['stage']:>5} {r['world']:>5} {mem:>16.1f} {opt:>15.1f} {r['ckpt_bytes'] * mib:>9.1f} "
            f"{r['save_s']:>7.2f} {r['load_s']:>7.2f} {r['tokens_per_s']:>9.0f} {rel:>10.2f}x"
        )
    return "\n".join(lines)
