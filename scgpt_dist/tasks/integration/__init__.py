"""Batch integration: GEP + GEPC + ECS + DAR (+ DSBN) finetuning, scored with the scib metrics against PCA,
Harmony and scVI."""

from scgpt_dist.tasks.integration.task import DESCRIPTION, run
from scgpt_dist.tasks.integration.task import IntegrationConfig as Config

__all__ = ["DESCRIPTION", "Config", "run"]
