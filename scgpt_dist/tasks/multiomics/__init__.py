"""Multi-omics (RNA + protein) integration with modality tokens and a grown vocabulary."""

from scgpt_dist.tasks.multiomics.task import DESCRIPTION, run
from scgpt_dist.tasks.multiomics.task import MultiomicsConfig as Config

__all__ = ["DESCRIPTION", "Config", "run"]
