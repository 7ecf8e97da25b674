#!/usr/bin/env bash
# #30 goal: a 1M-item, 2M-interaction synthetic set trains an epoch (sampled softmax, lazy Adam) and fully ranks
# a sample of its users (eval_users) on this 24 GB machine; /usr/bin/time -v records the peak RSS
cd /work/runs/epoch1m
export OMP_NUM_THREADS=1
start=$(date +%s)
/usr/bin/time -v python /work/runs/bench-wt2/run_recbole_speeder.py --model=Speeder --dataset=Scale \
  --data_path=/work/runs/prof/1m/data --config_files=/work/runs/epoch1m/scale.yaml --sampled_softmax_negatives=256 \
  --epochs=1 --eval_users=2000 --eval_exclude_history=True --sampled_eval=none --seed=2020 --show_progress=False \
  --checkpoint_dir=/work/runs/epoch1m/saved
echo "rc $? wall $(( $(date +%s) - start )) s"
