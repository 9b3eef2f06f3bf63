#!/bin/bash
# Transparent huge pages for torch's large CPU allocations (THP_MEM_ALLOC_ENABLE=1: c10 madvises
# allocations of 2 MB and more), off and on in turns, for every module alike.
cd "$(dirname "$0")/../../.."
for i in 1 2; do
  for thp in 0 1; do
    echo "== THP_MEM_ALLOC_ENABLE=$thp run $i"
    THP_MEM_ALLOC_ENABLE=$thp .venv/bin/python bench/precision_profile.py --repeats 5 2>&1 | grep "^|"
    THP_MEM_ALLOC_ENABLE=$thp .venv/bin/python bench/serve_throughput.py --scale 3 --repeats 7 --steps 30 --out /tmp/serve_thp 2>&1 | grep "^|"
  done
done
