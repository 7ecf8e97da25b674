"""Train and evaluate Speeder, or any RecBole model as a baseline, e.g.

    python run_recbole_speeder.py --model=Speeder --dataset=Amazon_Beauty
    python run_recbole_speeder.py --model=SASRec --dataset=ml-100k --epochs=5
"""

from recbole_speeder.cli import main

if __name__ == "__main__":
    main()
