"""Plugin trainers, found by ``utils.get_trainer`` as ``<Model>Trainer``."""
