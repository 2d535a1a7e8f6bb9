"""A larger census from back-to-back copies of a smaller one, for loader benchmarks at sizes the synthetic
generator cannot reach in the time at hand (`python -m jobs.bench data --tile-from`)."""

from __future__ import annotations

from pathlib import Path

from data_ingest import keys
from data_ingest.atomic import atomic_directory


def _suffix(col, suffix: str):
    """String column `col` with `suffix` appended, in the column's own string type."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(col, pa.scalar(suffix, col.type), pa.scalar("", col.type))


def tile_census(src: str | Path, out: str | Path, copies: int, block_cells: int = 8192) -> Path:
    """Write `copies` back-to-back copies of the census collection `src` as a new census at `out`.

    For loader benchmarks at sizes the synthetic generator cannot reach in the time at hand: the copy has the
    same sparsity, value distribution and X write pattern (one fragment per `block_cells` rows), rows
    grouped by dataset, and `copies` times as many datasets (copy k's dataset ids get the suffix `~k`).
    Cells repeat, so it is not for model training or evaluation.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import tiledbsoma

    src, out = str(src), Path(out)
    with tiledbsoma.Collection.open(src) as census:
        organism = next(iter(census[keys.CENSUS_DATA].keys()))
        exp = census[keys.CENSUS_DATA][organism]
        n = int(exp.obs.count)
        X_src = exp.ms[keys.MEASUREMENT_RNA].X[keys.RAW_LAYER]
        n_genes = int(X_src.shape[1])
        var = exp.ms[keys.MEASUREMENT_RNA].var.read().concat()
        summary = census[keys.CENSUS_INFO][keys.CENSUS_SUMMARY].read().concat()
        datasets = census[keys.CENSUS_INFO][keys.CENSUS_DATASETS].read().concat()
        obs_schema = exp.obs.schema
        with atomic_directory(out, create=False) as tmp:
            with tiledbsoma.Collection.create(str(tmp)) as dst:
                info = dst.add_new_collection(keys.CENSUS_INFO)
                data = dst.add_new_collection(keys.CENSUS_DATA)
                dexp = data.add_new_collection(organism, tiledbsoma.Experiment)
                obs = dexp.add_new_dataframe("obs", schema=obs_schema, domain=[(0, n * copies - 1)])
                rna = dexp.add_new_collection("ms").add_new_collection(
                    keys.MEASUREMENT_RNA, tiledbsoma.Measurement
                )
                X = rna.add_new_collection("X").add_new_sparse_ndarray(
                    keys.RAW_LAYER,
                    type=pa.float32(),
                    shape=(n * copies, n_genes),
                    platform_config=keys.CENSUS_X_PLATFORM_CONFIG,
                )
                rna.add_new_dataframe("var", schema=var.schema, domain=[(0, len(var) - 1)]).write(
                    var
                )
                for k in range(copies):
                    for lo in range(0, n, block_cells):
                        hi = min(lo + block_cells, n) - 1
                        shift = k * n
                        xt = X_src.read(coords=(slice(lo, hi),)).tables().concat()
                        X.write(
                            xt.set_column(
                                0, "soma_dim_0", pc.add(xt["soma_dim_0"], pa.scalar(shift))
                            )
                        )
                        ot = exp.obs.read(coords=(slice(lo, hi),)).concat()
                        ot = ot.set_column(
                            ot.schema.get_field_index(keys.SOMA_JOINID),
                            keys.SOMA_JOINID,
                            pc.add(ot[keys.SOMA_JOINID], pa.scalar(shift)),
                        )
                        for col in (keys.OBS_DATASET, keys.OBS_ID):
                            if col in ot.schema.names:
                                i = ot.schema.get_field_index(col)
                                ot = ot.set_column(
                                    i,
                                    ot.schema.field(i),
                                    _suffix(ot[col], f"~{k}"),
                                )
                        obs.write(ot)
                    print(f"tiled copy {k + 1}/{copies} of {src}", flush=True)
                summary = summary.set_column(
                    summary.schema.get_field_index("value"),
                    "value",
                    pa.array(
                        [
                            str(n * copies) if lab == "total_cell_count" else v
                            for lab, v in zip(
                                summary["label"].to_pylist(),
                                summary["value"].to_pylist(),
                                strict=True,
                            )
                        ]
                    ),
                )
                info.add_new_dataframe(
                    keys.CENSUS_SUMMARY, schema=summary.schema, domain=[(0, len(summary) - 1)]
                ).write(summary)
                dsets = pa.concat_tables(
                    [
                        datasets.set_column(
                            datasets.schema.get_field_index(keys.SOMA_JOINID),
                            keys.SOMA_JOINID,
                            pc.add(datasets[keys.SOMA_JOINID], pa.scalar(k * len(datasets))),
                        ).set_column(
                            datasets.schema.get_field_index(keys.OBS_DATASET),
                            datasets.schema.field(keys.OBS_DATASET),
                            _suffix(datasets[keys.OBS_DATASET], f"~{k}"),
                        )
                        for k in range(copies)
                    ]
                )
                info.add_new_dataframe(
                    keys.CENSUS_DATASETS, schema=dsets.schema, domain=[(0, len(dsets) - 1)]
                ).write(dsets)
    return out
