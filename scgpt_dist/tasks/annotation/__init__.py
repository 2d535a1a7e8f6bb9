"""Cell-type annotation: CLS finetuning on a reference split, scored on the query split against a from-scratch
model and logistic-regression baselines."""

from scgpt_dist.tasks.annotation.task import DESCRIPTION, run
from scgpt_dist.tasks.annotation.task import AnnotationConfig as Config

__all__ = ["DESCRIPTION", "Config", "run"]
