#!/usr/bin/env bash
# The main job end to end on planted synthetic data (no downloads, no shared data):
# synthesise → train → evaluate → export → predict, then print model vs oracle AUC.
set -euo pipefail
OUT="${1:-demo_out}"
MTREC="${MTREC:-.venv/bin/mtrec}"
ROWS="${DEMO_ROWS:-1000000}"
RUN="$OUT/run-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"

last_json() { tail -n 1; }

if [ ! -f "$OUT/data/config.yaml" ]; then
  echo "== 1/5 synthesise $ROWS rows of planted multi-task data -> $OUT/data" >&2
  "$MTREC" data synth --out "$OUT/data" --rows "$ROWS" --seed 0 | last_json | tee "$OUT/synth.json"
else
  echo "== 1/5 reuse $OUT/data (deterministic; delete it to regenerate)" >&2
fi
echo "== 2/5 train -> $RUN" >&2
"$MTREC" train --config "$OUT/data/config.yaml" --out "$RUN" | last_json | tee "$RUN.train.json"
echo "== 3/5 evaluate on the test split" >&2
"$MTREC" evaluate --run "$RUN" | last_json | tee "$RUN.eval.json"
echo "== 4/5 export TorchScript" >&2
"$MTREC" export --run "$RUN" | last_json | tee "$RUN.export.json"
echo "== 5/5 predict the test split through the exported file" >&2
"$MTREC" predict --model "$RUN/export/model.pt" --input "$OUT/data/test.parquet" \
  --out "$RUN/predictions.parquet" | last_json | tee "$RUN.predict.json"

.venv/bin/python - "$RUN.eval.json" "$RUN.train.json" <<'PY'
import json, sys
ev = json.load(open(sys.argv[1])); tr = json.load(open(sys.argv[2]))
print("\n task        model AUC   oracle AUC   gap", file=sys.stderr)
gaps = []
for task, m in ev["tasks"].items():
    gap = m["oracle_auc"] - m["auc"]; gaps.append(gap)
    print(f" {task:<10}  {m['auc']:.4f}      {m['oracle_auc']:.4f}       {gap:+.4f}", file=sys.stderr)
mean_model = sum(m["auc"] for m in ev["tasks"].values()) / len(ev["tasks"])
mean_oracle = sum(m["oracle_auc"] for m in ev["tasks"].values()) / len(ev["tasks"])
print(json.dumps({"demo": "ok", "run_dir": ev["run_dir"], "mean_auc": round(mean_model, 4),
                  "mean_oracle_auc": round(mean_oracle, 4), "gap": round(mean_oracle - mean_model, 4),
                  "train_samples_per_s": tr["samples_per_s"], "train_wall_s": tr["wall_s"]}))
PY
