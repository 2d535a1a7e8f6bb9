"""Perturbation response: flag-token finetuning against no-change, mean, linear and additive baselines."""

from scgpt_dist.tasks.perturbation.task import DESCRIPTION, run
from scgpt_dist.tasks.perturbation.task import PerturbationConfig as Config

__all__ = ["DESCRIPTION", "Config", "run"]
