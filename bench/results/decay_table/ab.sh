#!/bin/bash
# Alternating invocations: the code before this change (b669432, a worktree in /tmp/w/old) and after (/work/main).
set -e
PY=/work/main/.venv/bin/python
for i in 1 2; do
  for which in old new; do
    if [ $which = old ]; then dir=/tmp/w/old; else dir=/work/main; fi
    echo "== $which run $i $(date -u +%H:%M:%S)"
    (cd $dir && PYTHONPATH=$dir $PY bench/reassign_speed.py --repeats 7 2>&1 | grep -v "it/s\]" | tail -6)
    (cd $dir && PYTHONPATH=$dir $PY bench/precision_speed.py --ranks 1 --repeats 3 --steps 120 --reassign-every 100 2>&1 | grep -v "it/s\]" | tail -4)
  done
done
