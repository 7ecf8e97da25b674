"""Plugin trainers, found by ``utils.get_trainer`` as ``<Model>Trainer``."""

from recbole_speeder.trainer.checkpoint_file import CheckpointError
from recbole_speeder.trainer.trainer import NonFiniteLossError, SpeederTrainer

__all__ = ["CheckpointError", "NonFiniteLossError", "SpeederTrainer"]
