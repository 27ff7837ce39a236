#!/usr/bin/env bash
# Real features: each index kind scored against exact search on UKBench-1000 and Corel-1k
# (MobileNetV2, offline weights). Usage: bench/real_index_check.sh [WORKDIR] (default /tmp/ris-real)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/ris-real}"
DATA="../shared/data"
mkdir -p "$WORK"
for ds in ukbench1000 corel1k; do
  db="$WORK/$ds.h5"
  [ -f "$db" ] || ris-extract --dataset "$DATA/$ds" --features-db "$db" --model mobilenet_v2 --no-progress
  for kind in exact hnsw ivfpq "milvus:$WORK/$ds.milvus.db"; do
    out="$WORK/$ds.${kind%%:*}.json"
    ris-eval --features-db "$db" --index "$kind" --json > "$out"
    python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['index_type'], 'exact', r['exact']['ns_score'], r['exact']['map'], 'index', r['indexed']['ns_score'], r['indexed']['map'], 'delta', r['delta'])" "$out" "$ds"
  done
done
