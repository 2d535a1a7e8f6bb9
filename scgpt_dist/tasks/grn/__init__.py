"""Gene regulatory networks from gene embeddings and attention, scored against a planted network."""

from scgpt_dist.tasks.grn.task import DESCRIPTION, run
from scgpt_dist.tasks.grn.task import GrnTaskConfig as Config

__all__ = ["DESCRIPTION", "Config", "run"]
