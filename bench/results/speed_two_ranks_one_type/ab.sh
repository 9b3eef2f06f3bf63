# Ad hoc A/B of e06e3ed (run from /tmp/w/ab): "old" is 785f16b checked out at /tmp/w/old and put first on PYTHONPATH, "new" the working tree; prints repeat, code, mix, train_seconds, the plan's sharding types.
cd /tmp/w/ab
for i in 1 2 3 4; do for code in old new; do for m in f32 paper low; do
 case $m in f32) a="--precision fp32";; paper) a="--precision shark --tiers fp32 fp16 int8 --memory-budget 0.35 --reassign-every 100";; low) a="--precision shark --tiers int8 int4 int2 --memory-budget 0.125 --reassign-every 100";; esac
 if [ $code = old ]; then export PYTHONPATH=/tmp/w/old; else unset PYTHONPATH; fi
 rm -rf o_$code_$m; /work/main/.venv/bin/shark train --nproc 2 --synthetic-train-rows $((200*4096)) --synthetic-eval-rows 4096 --synthetic-scale 3 --batch-size 4096 --eval-batch-size 4096 --embedding-dim 64 $a --no-progress --out o_${code}_$m > log_${i}_${code}_$m.txt 2>&1
 t=$(grep train_seconds o_${code}_$m/metrics.json | tr -dc '0-9.'); types=$(grep -o "| [a-z_]*wise" o_${code}_$m/sharding_plan.txt | sort | uniq -c | tr -s ' ' | tr '\n' ';')
 echo "$i $code $m $t $types"; rm -rf o_${code}_$m
done; done; done
