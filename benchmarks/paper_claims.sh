#!/usr/bin/env bash
# The LaLoRA paper's claims tested on the shipped SmolLM2-135M (docs/results.md, "The paper's claims").
# Every part resumes its own runs.csv, so the script can be stopped and run again; the parts that
# only change the curvature or the adapter reuse the base model's row (and, for N_s, plain LoRA's
# runs, which do not depend on the curvature) from the first part.
# Usage: bash benchmarks/paper_claims.sh [PART...]   (parts: forms ns rank tuned steps; default all)
set -euo pipefail
cd "$(dirname "$0")/.."
LH=${LH:-.venv-test/bin/laplace-hub}
OUT=${OUT:-out/paper}
COMMON=(smollm2 --source pydoc=stdlib:pydoc --target arithmetic --seeds 0,1,2 -q)

seed_rows() {  # seed_rows FROM TO METHOD...: start TO/runs.csv with FROM's rows of these methods
    mkdir -p "$2"
    [ -f "$2/runs.csv" ] && return
    python3 - "$@" <<'EOF'
import csv, sys
source, target, *methods = sys.argv[1:]
with open(f"{source}/runs.csv", newline="") as f:
    rows = list(csv.DictReader(f))
with open(f"{target}/runs.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(r for r in rows if r["method"] in methods)
EOF
}

forms() {  # (b) DIAG vs B-K-FAC on the LoRA weights, and weight-space K-FAC at the default λ
    "$LH" sweep "${COMMON[@]}" --methods lora,lora_diag,lora_kron --strengths 1,10,100 --out "$OUT/forms" --resume
    "$LH" sweep "${COMMON[@]}" --methods lora,kron --strengths 10 --out "$OUT/forms" --resume
}

ns() {  # (d) curvature batches N_s ∈ {1, 2, 3}; "all" (8) is the forms part's kron row
    for n in 1 2 3; do
        seed_rows "$OUT/forms" "$OUT/ns-$n" base lora
        "$LH" sweep "${COMMON[@]}" --methods lora,kron --strengths 10 --curvature-batches "$n" \
            --out "$OUT/ns-$n" --resume
    done
}

rank() {  # (e) LoRA rank 32 (rank 8 is the forms part)
    seed_rows "$OUT/forms" "$OUT/rank-32" base
    "$LH" sweep "${COMMON[@]}" --methods lora,kron --strengths 10 --lora-rank 32 --out "$OUT/rank-32" --resume
}

tuned() {  # every knob tuned alike: the points --select budget picks next on the main sweep's grid, and lower
    # grids for the methods with no setting within a point of LoRA's validation EM there (L2, Mask-the-Target)
    seed_rows "$OUT/forms" "$OUT/tuned" base lora
    "$LH" sweep "${COMMON[@]}" --methods lora,l2,mtt,flat_lora,migu --strengths 0.1 --grid mtt=0.01 \
        --grid flat_lora=0.0707 --grid migu=0.612 --out "$OUT/tuned" --resume
}

steps() {  # (f) 120 training steps (40 is the forms part)
    seed_rows "$OUT/forms" "$OUT/steps-120" base
    "$LH" sweep "${COMMON[@]}" --methods lora,kron --strengths 10 --steps 120 --out "$OUT/steps-120" --resume
}

for part in "${@:-forms ns rank tuned steps}"; do
    for p in $part; do "$p"; done
done
