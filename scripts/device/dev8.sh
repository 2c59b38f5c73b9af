source scripts/device/setup.sh 2>/dev/null
nvidia-smi --query-gpu=index,name --format=csv | tee $OUT/r/info.log
python3 scripts/device/probe_accumulate.py 2>&1 | tee $OUT/r/probe.log
# Run-to-run spread of one setting: the same run twice.
for o in off off2; do date; timeout 120 python3 -m epplan run runs/one-medium.json --out /tmp/t-$o --steps 20 --device cuda --seed 3 --global-batch 16 --overlap off > /tmp/train-one-$o.log 2>&1; echo $o rc=$?; cp /tmp/t-$o/metrics.jsonl /tmp/train-one-$o.jsonl; done
python3 scripts/device/train_summary.py /tmp/train-one-off.jsonl /tmp/train-one-off2.jsonl; date
