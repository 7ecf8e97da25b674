"""recbole-speeder: the Speeder multimodal-LLM sequential recommender as a RecBole plugin."""

__version__ = "0.1.0"
