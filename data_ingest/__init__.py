"""Turn cells in a TileDB-SOMA experiment into scGPT token records and stream them with Ray Data."""
