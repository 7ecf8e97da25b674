#!/usr/bin/env bash
# #29: popularity of the top-10 lists (RecBole's AveragePopularity, TailPercentage with tail_ratio 4 = items trained
# at most 4 times, ItemCoverage, GiniIndex), test users, history excluded; code d7e3dd3
export OMP_NUM_THREADS=1
B=/work/runs/bl-out/saved/compare-Amazon_Beauty-20261207-101944
declare -A C=(
 [speeder-2020]=/work/runs/probe/saved-hd02/Speeder-Dec-07-2026_21-41-35.safetensors
 [speeder-2021]=/work/runs/probe/saved-hd02-2021/Speeder-Dec-07-2026_22-41-31.safetensors
 [speeder-2022]=/work/runs/probe/saved-hd02-2022/Speeder-Dec-07-2026_22-41-35.safetensors
 [shuffled-2020]=/work/runs/probe/saved-shuf-hd02/Speeder-Dec-07-2026_23-57-33.safetensors
 [sasrec-2020]=$(ls $B/seed-2020/*/SASRec*.pth) [sasrec-2021]=$(ls $B/seed-2021/*/SASRec*.pth) [sasrec-2022]=$(ls $B/seed-2022/*/SASRec*.pth))
for n in "${!C[@]}"; do
  [ -f pop-$n.json ] && continue
  python -m recbole_speeder.experiments.retest ${C[$n]} --data_path=/work/mainjob/dataset/ --show_progress=False \
    "--metrics=['Hit','NDCG','AveragePopularity','TailPercentage','ItemCoverage','GiniIndex']" --tail_ratio=4 \
    --topk=[10] --out=pop-$n.json > pop-$n.log 2>&1
  echo "$n rc $?"
done
