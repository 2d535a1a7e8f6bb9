"""Forward+backward throughput and peak memory of our model vs the reference scGPT `TransformerModel`.

python -m jobs.bench model                       # CPU, 4 layers, 256-d, 8 heads, 512 genes, batch 8
python -m jobs.bench model --device cuda --preset whole-human   # GPU: bf16, flash-attn when installed, MFU
python -m jobs.bench model --preset whole-human --attention flash --peak-tflops 1 --layers 1 --d-model 32 \
    --genes 48 --batch 2   # the GPU mode's code path dry-run on CPU (fp32; flash falls back to sdpa)

Our model runs once per attention backend (`--attention`; CPU default: sdpa and varlen), side by side with the
reference: the steps of all models alternate, so background load hits each alike.

Both models are built at the same config with the same objectives (GEP + GEPC masked MSE, 40% masked) and run
on the same tokenized batches. Two batch shapes: `full` (every cell has all genes: no padding) and `variable`
(cells of 64..genes expressed genes, padded to the longest, as scGPT's expressed-gene inputs are). Tokens/s counts
real (non-padding) tokens only, for both models. Peak memory: CPU = rise of the process's peak RSS over the
timed steps (VmHWM, reset per measurement through /proc/self/clear_refs); GPU = torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data_ingest import keys
from data_ingest.vocab import GeneVocab
from scgpt_dist.model.attention import BACKENDS, WORKSPACE
from scgpt_dist.model.config import ModelConfig
from scgpt_dist.model.reference import build_reference_model, load_reference_module
from scgpt_dist.model.sizes import SIZES
from scgpt_dist.model.transformer import build_model


def _shape(size: dict[str, int]) -> dict[str, int]:
    """A named model size (scgpt_dist.model.sizes) in this command's argument names."""
    return dict(
        layers=size["n_layers"], d_model=size["d_model"], heads=size["n_heads"], d_hid=size["d_hid"]
    )


PRESETS = {
    "small": dict(**_shape(SIZES["small"]), genes=512, batch=8),
    "whole-human": dict(**_shape(SIZES["whole-human"]), genes=1200, batch=32),
}
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}
"""Dense bf16 peak per GPU, by device-name substring, for MFU."""
N_VOCAB_GENES = 2000


@dataclass
class Result:
    model: str
    shape: str
    tokens_per_s: float
    ms_per_step: float
    peak_mib: float
    mfu: float | None = None


def _batch(n_cells: int, n_genes: int, variable: bool, vocab: GeneVocab, seed: int):
    g = torch.Generator().manual_seed(seed)
    if variable:
        low = min(64, max(2, n_genes // 4))
        lengths = torch.randint(low, n_genes + 1, (n_cells,), generator=g)
    else:
        lengths = torch.full((n_cells,), n_genes)
    seq = int(lengths.max())
    genes = torch.stack([torch.randperm(N_VOCAB_GENES, generator=g)[:seq] for _ in range(n_cells)])
    genes[:, 0] = vocab.cls_id
    values = torch.randint(0, 51, (n_cells, seq), generator=g).float()
    values[:, 0] = keys.PAD_VALUE
    padding = torch.arange(seq)[None, :] >= lengths[:, None]  # (B, L)
    genes[padding] = vocab.pad_id
    values[padding] = keys.PAD_VALUE
    maskable = ~padding
    maskable[:, 0] = False
    mask = maskable & (torch.rand(n_cells, seq, generator=g) < 0.4)
    masked = values.masked_fill(mask, float(keys.MASK_VALUE))
    return genes, values, masked, padding, mask


def _rss_peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _fix_mmap_threshold() -> None:
    """A fixed glibc mmap threshold makes freed tensors go back to the OS, so per-step peak RSS is exact."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _mse(pred, target, mask):
    m = mask.float()
    return ((pred.float() - target) ** 2 * m).sum() / m.sum().clamp(min=1)


def _step(model, reference: bool, data: tuple, device: str, dtype) -> None:
    """One forward + backward of GEP + GEPC masked MSE."""
    genes, values, masked, padding, mask = data
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        if reference:
            out = model(genes, masked, padding, MVC=True)
            gep, gepc = out["mlm_output"], out["mvc_output"]
        else:
            out = model(genes, masked, padding)
            gep, gepc = out["gep"], out["gepc"]
        loss = _mse(gep, values, mask) + _mse(gepc, values, mask)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _measure(
    step_fns: dict, rounds: int, warmup: int, device: str
) -> dict[str, tuple[float, float]]:
    """Median seconds per step and peak memory (MiB) of each step function.

    Steps of the models alternate (round-robin), so background load on a shared machine hits both alike.
    Our model's peak includes the attention workspace's buffers held between steps (`attention.WORKSPACE`),
    which it takes back without growing the process.
    """
    for fn in step_fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in step_fns}
    peaks: dict[str, float] = dict.fromkeys(step_fns, 0.0)
    for _ in range(rounds):
        for name, fn in step_fns.items():
            gc.collect()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                _reset_rss_peak()
                base = _rss_kib()
            held = WORKSPACE.held_bytes / 2**20 if name.startswith("ours") else 0.0
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:
                peak = (_rss_peak_kib() - base) / 1024 + held
            times[name].append(time.perf_counter() - t0)
            peaks[name] = max(peaks[name], peak)
    return {k: (statistics.median(v), peaks[k]) for k, v in times.items()}


def bench(args: argparse.Namespace) -> list[Result]:
    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision]
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(N_VOCAB_GENES - 3)])
    backends = args.attention or (["flash"] if device == "cuda" else ["sdpa", "varlen"])
    cfgs = {
        backend: ModelConfig(
            d_model=args.d_model,
            n_heads=args.heads,
            n_layers=args.layers,
            d_hid=args.d_hid,
            dropout=args.dropout,
            use_batch_labels=False,
            attention=backend,
        )
        for backend in backends
    }
    ref_args = {
        "embsize": args.d_model,
        "nheads": args.heads,
        "d_hid": args.d_hid,
        "nlayers": args.layers,
        "dropout": args.dropout,
        "MVC": True,
    }
    torch.manual_seed(0)
    ref = build_reference_model(ref_args, vocab).to(device).train()
    ours = {}
    for backend, cfg in cfgs.items():
        torch.manual_seed(0)
        ours[f"ours ({backend})"] = build_model(cfg, len(vocab), vocab.pad_id).to(device).train()
    peak_tflops = args.peak_tflops
    if device == "cuda" and peak_tflops is None:
        name = torch.cuda.get_device_name()
        peak_tflops = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)
    results = []
    for shape in args.shapes:
        data = tuple(
            t.to(device) for t in _batch(args.batch, args.genes, shape == "variable", vocab, 0)
        )
        padding = data[3]
        n_real = int((~padding).sum())

        steps = {"reference": functools.partial(_step, ref, True, data, device, dtype)}
        for name, model in ours.items():
            steps[name] = functools.partial(_step, model, False, data, device, dtype)
        measured = _measure(
            steps,
            args.steps,
            args.warmup,
            device,
        )
        for name, (sec, peak) in measured.items():
            tps = n_real / sec
            mfu = None
            if peak_tflops:
                # Useful FLOPs of the real tokens, for both models (the reference also computes padding).
                mean_len = int((~padding).sum(1).float().mean())
                flops = next(iter(ours.values())).flops_per_token(mean_len)
                mfu = flops * tps / (peak_tflops * 1e12)
            results.append(Result(name, shape, tps, sec * 1e3, peak, mfu))
    return results


def format_table(results: list[Result]) -> str:
    ref = {r.shape: r.tokens_per_s for r in results if r.model == "reference"}
    show_mfu = any(r.mfu is not None for r in results)
    head = f"{'model':<18} {'batch shape':<11} {'tokens/s':>10} {'ms/step':>9} {'peak MiB':>9} {'vs ref':>7}"
    head += f" {'MFU':>6}" if show_mfu else ""
    lines = [head, "-" * len(head)]
    for r in results:
        line = (
            f"{r.model:<18} {r.shape:<11} {r.tokens_per_s:>10.0f} {r.ms_per_step:>9.1f} "
            f"{r.peak_mib:>9.1f} {r.tokens_per_s / ref[r.shape]:>6.2f}x"
        )
        if show_mfu:
            line += f" {100 * r.mfu:>5.1f}%" if r.mfu is not None else f" {'-':>6}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.bench model", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for name in ("layers", "d_model", "heads", "d_hid", "genes", "batch"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="autocast dtype; default bf16 on cuda, fp32 on cpu (the GPU path dry-runs on CPU in fp32)",
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        choices=BACKENDS,
        default=None,
        help="our attention backends, each measured; default sdpa and varlen on CPU, flash on GPU",
    )
    parser.add_argument(
        "--shapes", nargs="+", choices=("full", "variable"), default=["full", "variable"]
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="accelerator peak for MFU (default: the GPU's bf16 peak when known; none on CPU)",
    )
    args = parser.parse_args(argv)
    if args.device == "cpu":
        _fix_mmap_threshold()
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU; none is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        load_reference_module()
    except ImportError as err:
        raise ValueError(f"{err}") from err
    print(
        f"{args.layers} layers, {args.d_model}-d, {args.heads} heads, d_hid {args.d_hid}, {args.genes} genes, "
        f"batch {args.batch}, dropout {args.dropout}, {args.device}"
        + f" {args.precision}"
        + (f", {torch.get_num_threads()} threads" if args.device == "cpu" else "")
        + f", {args.steps} timed steps after {args.warmup} warmup"
    )
    print(format_table(bench(args)))
    return 0


if __name__ == "__main__":
    from jobs._cli import run_main

    run_main(main)
