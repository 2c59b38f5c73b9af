source scripts/device/setup.sh
{
nvidia-smi --query-gpu=index,name,memory.total,power.limit,clocks.max.sm,clocks.sm --format=csv
nvidia-smi topo -m
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version())"
df -h /tmp /dev/shm | cat
} 2>&1 | tee $OUT/r/info.log
B="scripts/bench_runtime.py --rounds 8 --peer megatron"
date; timeout 250 torchrun --nproc-per-node 2 $B --variants reference,auto --out $OUT/r/x2 > $OUT/r/x2.log 2>&1; echo rc=$?
grep -v -i warn $OUT/r/x2.log | tail -22
date; timeout 280 torchrun --nproc-per-node 4 $B --variants reference,auto,8/8 --overlap-ctas 4,8,16 --out $OUT/r/x4 > $OUT/r/x4.log 2>&1; echo rc=$?
grep -v -i warn $OUT/r/x4.log | tail -24
date
