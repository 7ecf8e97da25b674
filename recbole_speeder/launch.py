"""The process entry point of ``run_recbole_speeder.py``, the ``recbole-speeder`` command and
``python -m recbole_speeder``: one place for what must happen before torch loads."""

import os


def main() -> None:
    """Run the command line of :mod:`recbole_speeder.cli`; returns nothing, so a console script exits with 0."""
    # OpenMP threads waiting at a barrier sleep instead of spinning: spinning threads slow each other down badly
    # when another process shares the cores (BENCHMARKS.md, "Thread wait policy"). Set OMP_WAIT_POLICY to override.
    # It must be set before torch loads its OpenMP runtime, hence the late import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from recbole_speeder.cli import main as run_command_line

    run_command_line()
