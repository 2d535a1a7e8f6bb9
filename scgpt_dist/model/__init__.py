"""The scGPT model on its own: configuration, embeddings, attention backends, transformer, heads, objectives
and batch collation. Imports nothing beyond torch and numpy (and the project's constants in
`data_ingest.keys`), so it runs on a machine with only torch installed (`tests/scgpt_dist/model/test_standalone.py`)."""

from scgpt_dist.model.config import ModelConfig
from scgpt_dist.model.transformer import ScGPT, build_model

__all__ = ["ModelConfig", "ScGPT", "build_model"]
