source scripts/device/setup.sh
date
# NCCL through host memory (P2P off): the cross-node bandwidth regime.
NCCL_P2P_DISABLE=1 timeout 260 torchrun --nproc-per-node 4 scripts/bench_runtime.py --rounds 6 --skip nccl,check,gemm,sdpa,interference --sdpa CUDNN_ATTENTION --overlap-ctas 4,8,16 --variants reference,8/4,8/8,16/8,8/16 --out $OUT/r/shm > $OUT/r/shm.log 2>&1; echo rc=$?
grep -v -i warn $OUT/r/shm.log | tail -14
M=runs/quad-medium.json; A="--steps 20 --device cuda --seed 3"
for t in nvlink shm; do for o in off on; do
  date; [ $t = shm ] && export NCCL_P2P_DISABLE=1
  timeout 100 python3 -m epplan run $M --out /tmp/t-$t-$o $A --overlap $o > $OUT/r/train-$t-$o.log 2>&1; echo $t $o rc=$?
  cp /tmp/t-$t-$o/metrics.jsonl $OUT/r/train-$t-$o.jsonl 2>/dev/null
done; done
python3 scripts/device/train_summary.py $OUT/r/train-*.jsonl
cd $OUT/r && tar czf ../train.tgz train-* && rm -f train-*; date
