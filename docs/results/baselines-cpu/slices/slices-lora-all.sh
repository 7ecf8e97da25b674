#!/usr/bin/env bash
# #29: LoRA on every linear layer against the defaults and SASRec, by slice, seeds 2020-2022; code 28e6993
cd /work/runs/slices22
export OMP_NUM_THREADS=1
B=/work/runs/bl-out/saved/compare-Amazon_Beauty-20261207-101944
for seed in 2020 2021 2022; do
  if [ $seed = 2020 ]; then pre=/work/runs/probe/saved-hd02; lora=/work/runs/probe/saved-loraall
  else pre=/work/runs/probe/saved-hd02-$seed; lora=/work/runs/probe/saved-loraall-$seed; fi
  python -m recbole_speeder.experiments.slices SASRec=$(ls $B/seed-$seed/*/SASRec*.pth) \
    Speeder=$(ls $pre/Speeder-*[0-9].safetensors) "Speeder[lora-all]=$(ls $lora/Speeder-*[0-9].safetensors)" \
    --eval_exclude_history=True --data_path=/work/mainjob/dataset/ --show_progress=False --out=slices-lora-all-seed$seed.json > slices-$seed.log 2>&1
  echo "$seed rc $?"
done
python -m recbole_speeder.experiments.slices --combine slices-lora-all-seed2020.json slices-lora-all-seed2021.json slices-lora-all-seed2022.json > combined-lora-all.md
echo "combine rc $?"
