"""``python -m recbole_speeder``: the same command line as ``run_recbole_speeder.py`` and ``recbole-speeder``."""

from recbole_speeder.launch import main

main()
