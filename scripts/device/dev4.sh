source scripts/device/setup.sh 2>/dev/null
nvidia-smi --query-gpu=index,name --format=csv | tee $OUT/r/info.log
B="scripts/bench_runtime.py --rounds 8 --skip nccl,check,gemm,sdpa,interference --sdpa CUDNN_ATTENTION --overlap-ctas 4,8"
date; NCCL_P2P_DISABLE=1 timeout 170 torchrun --nproc-per-node 4 $B --variants reference,auto,16/8,8/4 --out $OUT/r/shm > $OUT/r/shm.log 2>&1; echo rc=$?
grep -A6 "^variant" $OUT/r/shm.log
date; timeout 130 torchrun --nproc-per-node 4 $B --variants reference,auto,8/4 --out $OUT/r/x4 > $OUT/r/x4.log 2>&1; echo rc=$?
grep -A5 "^variant" $OUT/r/x4.log
date; timeout 110 torchrun --nproc-per-node 2 $B --variants reference,auto,8/4 --out $OUT/r/x2 > $OUT/r/x2.log 2>&1; echo rc=$?
grep -A5 "^variant" $OUT/r/x2.log
export NCCL_P2P_DISABLE=1
for o in off on; do date; timeout 90 python3 -m epplan run runs/quad-medium.json --out /tmp/t-$o --steps 20 --device cuda --seed 3 --overlap $o > /tmp/train-$o.log 2>&1; echo $o rc=$?; cp /tmp/t-$o/metrics.jsonl /tmp/train-shm-$o.jsonl; done
python3 scripts/device/train_summary.py /tmp/train-shm-*.jsonl; cd /tmp && tar czf $OUT/train.tgz train-*; date
