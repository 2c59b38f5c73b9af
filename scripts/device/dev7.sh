source scripts/device/setup.sh 2>/dev/null
nvidia-smi --query-gpu=index,name --format=csv | tee $OUT/r/info.log
# epplan run on a GPU after the meta-device build (weights materialised on the GPU, seeded per name).
# The manifest's global batch (64 x 2,048 tokens) does not fit one GPU: the run must say so.
date; timeout 120 python3 -m epplan run runs/one-medium.json --out /tmp/t-oom --steps 5 --device cuda > /tmp/train-one-oom.log 2>&1; echo oom rc=$?
grep -v -i warn /tmp/train-one-oom.log | tail -2
for o in off on; do date; timeout 120 python3 -m epplan run runs/one-medium.json --out /tmp/t-$o --steps 20 --device cuda --seed 3 --global-batch 16 --overlap $o > /tmp/train-one-$o.log 2>&1; echo $o rc=$?; tail -2 /tmp/train-one-$o.log; cp /tmp/t-$o/metrics.jsonl /tmp/train-one-$o.jsonl; done
python3 scripts/device/train_summary.py /tmp/train-one-off.jsonl /tmp/train-one-on.jsonl; cd /tmp && tar czf $OUT/train.tgz train-one-*; date
