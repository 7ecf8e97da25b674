"""Generative answers (``predict_mode: generate``): the answerer (``answerer``), which candidates are listed
(``sampling``) and how answers are decoded (``decoding``)."""

from recbole_speeder.model.generative.answerer import GenerativeAnswerer

__all__ = ["GenerativeAnswerer"]
