"""Column names, special tokens and layout names shared by every module.

One place for string keys, so a rename is a one-line change and a typo is an import error.
"""

# Token record columns (docs/architecture.md, "The token record").
GENES = "genes"
VALUES = "values"
BATCH = "batch"
MODALITY = "modality"
CELL_ID = "cell_id"
LABEL = "label"
PERTURBATION = "perturbation"
# Two more records of the same cell from its counts split in two (tokenizer.thinned_view), for the
# thinned-view contrast (objectives.cce_view: thinned): view i's columns are VIEW_GENES[i], VIEW_VALUES[i].
VIEW_GENES = ("view1_genes", "view2_genes")
VIEW_VALUES = ("view1_values", "view2_values")

# Special gene tokens, in the order they get ids in a new vocabulary.
PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)

# Value codes (scGPT reference): pad value and the GEP mask value.
PAD_VALUE = -2
MASK_VALUE = -1

# Modalities.
MODALITY_RNA = 0
MODALITY_ATAC = 1
MODALITY_PROTEIN = 2

# SOMA layout (the CELLxGENE Census layout).
SOMA_JOINID = "soma_joinid"
MEASUREMENT_RNA = "RNA"
RAW_LAYER = "raw"
VAR_GENE_NAME = "feature_name"
VAR_GENE_ID = "feature_id"
OBS_DATASET = "dataset_id"
OBS_CELL_TYPE = "cell_type"
OBS_CELL_TYPE_ID = "cell_type_ontology_term_id"
OBS_TISSUE = "tissue"
OBS_TISSUE_GENERAL = "tissue_general"
OBS_ASSAY = "assay"
OBS_IS_PRIMARY = "is_primary_data"
OBS_DISEASE = "disease"
OBS_SEX = "sex"
OBS_DONOR = "donor_id"
OBS_SUSPENSION = "suspension_type"
OBS_NNZ = "nnz"
OBS_RAW_SUM = "raw_sum"
VAR_NNZ = "nnz"
OBS_ID = "obs_id"
"""Unique cell name column (what `tiledbsoma.io` registration matches obs on)."""
VAR_ID = "var_id"
"""Unique gene name column (what `tiledbsoma.io` registration matches var on)."""

# CELLxGENE Census collection layout: `<census>/census_data/<organism>` is the experiment,
# `<census>/census_info/{summary,datasets}` describe the release.
CENSUS_DATA = "census_data"
CENSUS_INFO = "census_info"
CENSUS_SUMMARY = "summary"
CENSUS_DATASETS = "datasets"
DEFAULT_ORGANISM = "homo_sapiens"
PRIMARY_FILTER = "is_primary_data == True"
CENSUS_X_PLATFORM_CONFIG = {
    "tiledb": {
        "create": {
            "capacity": 2**16,
            "dims": {
                "soma_dim_0": {"tile": 2048, "filters": [{"_type": "ZstdFilter", "level": 5}]},
                "soma_dim_1": {
                    "tile": 2048,
                    "filters": ["ByteShuffleFilter", {"_type": "ZstdFilter", "level": 5}],
                },
            },
            "attrs": {
                "soma_data": {"filters": ["ByteShuffleFilter", {"_type": "ZstdFilter", "level": 5}]}
            },
            "cell_order": "row-major",
            "tile_order": "row-major",
        }
    }
}
"""TileDB schema of X as the CELLxGENE Census builder writes it (2,048 x 2,048 space tiles, data tiles of 2^16
values, byte-shuffled zstd; the census's positive-delta filter on soma_dim_0 rejected our unordered writes,
so plain zstd there). Our writers use it so reads cost what they cost on the census: small
shuffle chunks decode less beyond their own rows than with TileDB-SOMA's defaults (100,000-value data tiles,
16,384 synthetic cells at 3,000 genes in 128-cell chunks: 20.8k against 12.2k cells/s on one thread)."""

# Files inside checkpoint and model directories.
CONFIG_FILE = "config.yaml"
VOCAB_FILE = "vocab.json"
META_FILE = "meta.json"
MODEL_FILE = "model.safetensors"

# Perturbation screens (GEARS naming: "A+ctrl" for a single, "A+B" for a double, "ctrl" for control cells).
OBS_PERTURBATION = "perturbation"
OBS_CONDITION = "condition"
CONTROL_CONDITION = "ctrl"
PERT_SEPARATOR = "+"
UNS_PERTURBATION_TRUTH = "perturbation_truth"
UNS_EXPECTED_LFC = "expected_lfc"
UNS_EXPECTED_LFC_INDEX = "expected_lfc_perturbations"
