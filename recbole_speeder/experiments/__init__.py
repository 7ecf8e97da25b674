"""What users run after a first training: ``--compare`` (models side by side) and ``--tune`` (sweeps).

``commands`` adds the flags to the run script and dispatches; ``runner`` trains and tests one isolated model;
``compare`` and ``report`` build the comparison tables and chart; ``seeds`` repeats a comparison over seeds and
reports mean ± std; ``search_space``, ``tune``, ``ray_sweep`` and ``hyperopt_sweep`` run hyper-parameter sweeps.
See docs/experiments.md.
"""
