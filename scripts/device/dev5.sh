source scripts/device/setup.sh 2>/dev/null
nvidia-smi --query-gpu=index,name --format=csv | tee $OUT/r/info.log
export NCCL_P2P_DISABLE=1
M=runs/2x2-medium.json
for o in auto off; do date; P=$((29400 + RANDOM % 500))
  W="$M --out /tmp/n-$o --device cuda --steps 40 --seed 3 --overlap $o"
  CUDA_VISIBLE_DEVICES=2,3 timeout 170 python3 -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint localhost:$P --rdzv-id r-$o --max-restarts 0 -m epplan.train.worker $W --node-rank 1 > /tmp/node1-$o.log 2>&1 &
  CUDA_VISIBLE_DEVICES=0,1 timeout 170 python3 -m epplan run $W --nnodes 2 --node-rank 0 --rdzv-endpoint localhost:$P --rdzv-id r-$o > /tmp/node0-$o.log 2>&1; echo $o rc=$?
  wait; cp /tmp/n-$o/metrics.jsonl /tmp/train-2node-$o.jsonl; tail -3 /tmp/node0-$o.log; tail -2 /tmp/node1-$o.log
done
python3 scripts/device/train_summary.py /tmp/train-2node-*.jsonl
python3 -c "import json; [print(f, json.loads(open(f).readline()).get('overlap')) for f in ['/tmp/train-2node-auto.jsonl','/tmp/train-2node-off.jsonl']]"
cd /tmp && tar czf $OUT/train2.tgz train-2node-* node*-*.log; date
