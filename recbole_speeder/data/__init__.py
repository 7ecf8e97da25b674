from recbole_speeder.data.dataset import SpeederDataset

__all__ = ["SpeederDataset"]
