from recbole_speeder.model.speeder import Speeder

__all__ = ["Speeder"]
