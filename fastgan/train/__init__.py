"""A GAN trainer on fastgan layers: lazy R1, EMA, checkpoints, resume, torchrun.

``TrainSteps`` (steps.py) is the reusable core; ``train(TrainConfig(...))`` (trainer.py) the
whole loop; ``fastgan train`` (cli.py) its command line.
"""
from fastgan.train.config import TrainConfig
from fastgan.train.steps import TrainSteps
from fastgan.train.trainer import train

__all__ = ["TrainConfig", "TrainSteps", "train"]
