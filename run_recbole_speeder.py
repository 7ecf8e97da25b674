"""Train and evaluate Speeder, or any RecBole model as a baseline, e.g.

    python run_recbole_speeder.py --model=Speeder --dataset=Amazon_Beauty
    python run_recbole_speeder.py --model=SASRec --dataset=ml-100k --epochs=5
"""

import os

# OpenMP threads waiting at a barrier sleep instead of spinning. With one other busy process on 2 cores, spinning
# made ranking 2.4x slower; alone, sleeping costs ~4% (BENCHMARKS.md). Set OMP_WAIT_POLICY to override.
# It must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from recbole_speeder.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
