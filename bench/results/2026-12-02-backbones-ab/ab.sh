#!/usr/bin/env bash
# Same-call A/B on the GPU: MQAR cells with the pre-redesign binary (.gpu/old, 8c53874) and the
# redesigned one (.gpu), then the GPU tests. Results under $OUT.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=bench/results/2026-12-02-backbones-ab
bash .gpu/run.sh models > /dev/null; bash .gpu/old/run.sh models > /dev/null
cell() { # label runner preset model
  bash $2 compare --preset $3 --parts mqar --models $4 --device cuda --out /tmp/ab-$1 > /tmp/ab-$1.log 2>&1
  sed "s/^{/{\"run\":\"$1\",/" /tmp/ab-$1/mqar.jsonl >> $OUT/ab-mqar.jsonl
}
cell old-transformer-1 .gpu/old/run.sh .gpu/old/transformer.toml transformer &
cell old-transformer-2 .gpu/old/run.sh .gpu/old/transformer.toml transformer &
cell new-transformer-1 .gpu/run.sh $R/transformer-64-4-w64-lr3e-3.toml transformer &
cell new-transformer-2 .gpu/run.sh $R/transformer-64-4-w64-lr3e-3.toml transformer &
cell old-rwkv4-1 .gpu/old/run.sh .gpu/old/rwkv4.toml rwkv4 &
cell new-rwkv4-1 .gpu/run.sh $R/rwkv4-64-4-w128-lr1e-3.toml rwkv4 &
wait
tail -n 2 /tmp/ab-*.log > $OUT/ab-logs.txt
bash .gpu/run-tests.sh > $OUT/gpu-tests.log 2>&1; grep -E "test result|FAILED|panicked" $OUT/gpu-tests.log
cut -c1-160 $OUT/ab-mqar.jsonl
