"""How models are evaluated: the protocol around RecBole's trainer (``protocol``), how sampled candidate lists are
drawn (``candidates``) and the generative answers' metrics (``metrics``)."""
