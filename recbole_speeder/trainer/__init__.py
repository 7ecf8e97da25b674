"""Plugin trainers, found by ``utils.get_trainer`` as ``<Model>Trainer``; checkpoint loading for inference."""

from recbole_speeder.trainer.checkpoint import CheckpointError
from recbole_speeder.trainer.load import load_speeder
from recbole_speeder.trainer.mpo import NonFiniteLossError, SpeederTrainer

__all__ = ["CheckpointError", "NonFiniteLossError", "SpeederTrainer", "load_speeder"]
