source scripts/device/setup.sh
{
nvidia-smi --query-gpu=index,name,memory.total,power.limit,clocks.max.sm --format=csv
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version())"
} 2>&1 | tee $OUT/r/info.log
date; timeout 300 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 8 --peer megatron --variants reference,auto --out $OUT/r/x1 > $OUT/r/x1.log 2>&1; echo rc=$?
grep -v -i warn $OUT/r/x1.log | tail -22; date
