source scripts/device/setup.sh 2>/dev/null
nvidia-smi --query-gpu=index,name --format=csv | tee $OUT/r/info.log
date; timeout 200 torchrun --nproc-per-node 2 scripts/bench_runtime.py --rounds 8 --peer megatron --variants reference,auto,8/4 --out $OUT/r/x2 > $OUT/r/x2.log 2>&1; echo rc=$?
grep -v -i warn $OUT/r/x2.log | tail -20; date
