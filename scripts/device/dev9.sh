source scripts/device/setup.sh 2>/dev/null
nvidia-smi --query-gpu=index,name --format=csv | tee $OUT/r/info.log
python3 scripts/device/probe_memory.py 2>&1 | grep -v Warn | tee $OUT/r/memory.log
