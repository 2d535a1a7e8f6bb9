"""Embed the cells of an .h5ad with a consolidated model; writes `obsm["X_scGPT"]`.

python -m jobs.embed --checkpoint outputs/demo/model --h5ad cells.h5ad [--out cells_embedded.h5ad]
"""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

from data_ingest.soma_store import read_h5ad_checked
from jobs._cli import run_main, setup_logging
from scgpt_dist.inference import EMBEDDING_KEY, embed_anndata
from scgpt_dist.train.checkpoint import load_consolidated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.embed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="consolidated model directory (model/)")
    parser.add_argument(
        "--h5ad", required=True, help="input AnnData; non-negative values, gene names"
    )
    parser.add_argument("--out", help="output .h5ad (default: <input>_scgpt.h5ad)")
    parser.add_argument(
        "--gene-column", help="var column holding gene symbols (default: var_names)"
    )
    parser.add_argument(
        "--max-unknown-fraction",
        type=float,
        default=0.5,
        help="largest fraction of genes unknown to the vocabulary to accept (dropped)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    setup_logging()

    loaded = load_consolidated(args.checkpoint)
    adata = read_h5ad_checked(args.h5ad)
    if args.gene_column:
        if args.gene_column not in adata.var:
            raise ValueError(
                f"--gene-column {args.gene_column!r} is not a var column; have {list(adata.var)}"
            )
        adata.var_names = adata.var[args.gene_column].astype(str).values
    adata.obsm[EMBEDDING_KEY] = embed_anndata(
        loaded, adata, args.batch_size, args.max_unknown_fraction, show_progress=True
    )
    out = Path(args.out or str(Path(args.h5ad).with_suffix("")) + "_scgpt.h5ad")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {adata.n_obs} cell embeddings ({adata.obsm[EMBEDDING_KEY].shape[1]}-d) to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
