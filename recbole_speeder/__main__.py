"""``python -m recbole_speeder``: the same command line as ``run_recbole_speeder.py`` and ``recbole-speeder``."""

import sys

from recbole_speeder.launch import main

sys.argv[0] = "python -m recbole_speeder"  # argparse names the program in its usage line after it, not "__main__.py"
main()
