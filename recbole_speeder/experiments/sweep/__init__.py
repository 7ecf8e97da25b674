"""``--tune``: the search space (``space``), what a sweep is made of (``spec``), the runner and its reports (``run``),
and the two tools (``ray_tune``, ``hyperopt_tune``)."""
