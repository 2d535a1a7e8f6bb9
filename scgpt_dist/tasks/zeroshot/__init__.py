"""Zero-shot cell embeddings: kNN annotation and scib metrics against HVG + PCA and scVI."""

from scgpt_dist.tasks.zeroshot.task import DESCRIPTION, run
from scgpt_dist.tasks.zeroshot.task import ZeroshotConfig as Config

__all__ = ["DESCRIPTION", "Config", "run"]
