"""Train and evaluate Speeder, or any RecBole model as a baseline, e.g.

    python run_recbole_speeder.py --model=Speeder --dataset=Amazon_Beauty
    python run_recbole_speeder.py --model=SASRec --dataset=ml-100k --epochs=5

An installed package offers the same command line as ``recbole-speeder`` and ``python -m recbole_speeder``.
"""

from recbole_speeder.launch import main

if __name__ == "__main__":
    main()
