"""What users run after a first training: ``--compare`` (models side by side) and ``--tune`` (sweeps).

``commands`` adds the flags to the run script and dispatches; ``runner`` trains and tests one isolated model;
``compare`` and ``report`` build the comparison tables and chart; ``seeds`` repeats a comparison over seeds and
reports mean ± std; ``sweep/`` runs hyper-parameter sweeps; ``retest`` tests a trained model again under another
protocol and ``slices`` compares trained models by slice of users.
See docs/experiments.md.
"""
