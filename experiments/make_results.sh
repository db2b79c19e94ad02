#!/usr/bin/env bash
# Regenerate every table and figure of experiments/RESULTS.md for one trained run.
#
#   experiments/make_results.sh RUN_DIR OUT_DIR [TRAIN_MANIFEST]
#
# RUN_DIR         a training run (RUN/stageN/{config.json,checkpoints/best.npz}), e.g. runs/cpu-small
# OUT_DIR         where everything goes (created)
# TRAIN_MANIFEST  the run's training manifest: VoxelMorph is trained on its 'train' split
#                 (without it VXM is skipped)
#
# Environment (defaults in brackets):
#   PYTHON [python]          interpreter with spirs-tf installed
#   TEST_MANIFEST []         evaluate this manifest instead of synthesising a test cohort
#   PATIENTS [16] SEED [777] synthetic test cohort: `spirs synth --pose raw` on the run's grid and spacing
#   SPLIT [all]              split of the test manifest (a synthesised cohort is unseen: all of it)
#   LIMIT []                 at most this many test pairs for every script
#   COMPARE_LIMIT [20]       at most this many test pairs for the baselines (ANTs is slow)
#   ANTS [default]           ANTs SyN settings: paper (about 5 min per 32^3 pair on 2 cores) | default | none
#   NET_PASSES [3] NET_SYMMETRIC [on]  Figure 5's extra row "SPIRS ×3 symmetric": the network alone run as
#                            `spirs predict --affine-passes 3 --affine-symmetric on` runs it (beyond the paper;
#                            NET_PASSES=1 NET_SYMMETRIC=off: no extra row)
#   VXM_STEPS [1000]         VoxelMorph training steps
#   TRAIN_LIMIT [64]         at most this many training pairs for VoxelMorph (spread evenly)
#   VXM_WEIGHTS []           load these VoxelMorph weights (.weights.h5, e.g. an earlier OUT/figure5/
#                            vxm.weights.h5) instead of training
#   REFINE [full]            Table 1 as users get it: `spirs predict --refine REFINE` on the whole test
#                            split (P2 from that registration), scored on the new scans' own grids
#                            (table1/table1_predict.md); none skips it. LIMIT does not apply to it.
#
# Every script writes its per-case CSV first, then a figure/table and a results.md snippet; all snippets
# are concatenated into OUT_DIR/RESULTS_snippets.md at the end.
set -euo pipefail

RUN=${1:?usage: make_results.sh RUN_DIR OUT_DIR [TRAIN_MANIFEST]}
OUT=${2:?usage: make_results.sh RUN_DIR OUT_DIR [TRAIN_MANIFEST]}
TRAIN_MANIFEST=${3:-}
PYTHON=${PYTHON:-python}
PATIENTS=${PATIENTS:-16}
SEED=${SEED:-777}
SPLIT=${SPLIT:-all}
ANTS=${ANTS:-default}
VXM_STEPS=${VXM_STEPS:-1000}
COMPARE_LIMIT=${COMPARE_LIMIT:-20}
TRAIN_LIMIT=${TRAIN_LIMIT:-64}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$OUT"
LIMIT_ARGS=()
[ -n "${LIMIT:-}" ] && LIMIT_ARGS=(--limit "$LIMIT")

# 1. the synthetic test cohort, on the run's working grid and spacing (highest stage's config)
if [ -z "${TEST_MANIFEST:-}" ]; then
  read -r GRID SPACING < <("$PYTHON" - "$RUN" <<'EOF'
import glob, json, os, sys
cfgs = sorted(glob.glob(os.path.join(sys.argv[1], "stage*", "config.json")))
if not cfgs:
    sys.exit(f"make_results.sh: no stage*/config.json in {sys.argv[1]}")
data = json.load(open(cfgs[-1]))["data"]
print(data["grid_size"], data["spacing_mm"])
EOF
)
  if [ ! -f "$OUT/cohort/manifest.csv" ]; then
    "$PYTHON" -m spirs_tf.cli synth --patients "$PATIENTS" --pose raw --seed "$SEED" --grid "$GRID" \
      --spacing "$SPACING" --out "$OUT/cohort" --quiet
  fi
  TEST_MANIFEST="$OUT/cohort/manifest.csv"
fi
COMMON=(--run "$RUN" --manifest "$TEST_MANIFEST" --split "$SPLIT" "${LIMIT_ARGS[@]}")

# 2. per-pair registration and per-lesion segmentation metrics (Tables 1, 3 and Figure 4 read these)
"$PYTHON" "$HERE/evaluate.py" "${COMMON[@]}" --out "$OUT/evaluate"

# 3. Table 1: P1 vs P2 per lesion-size bin (median DSC, HD95, sensitivity with exact CI, McNemar)
mkdir -p "$OUT/table1"
"$PYTHON" "$HERE/segmentation_table.py" "$OUT/evaluate/per_lesion.csv" --out "$OUT/table1/table1.csv" \
  --markdown "$OUT/table1/table1.md" > /dev/null

# 3b. Table 1 as `spirs predict` gives it: P2 from the refined registration (evaluate.py above gives P2 the
#     network's own registration, as the paper's Table 1 does), scored on each new scan's own grid
if [ "${REFINE:-full}" != none ]; then
  "$PYTHON" -m spirs_tf.cli predict --model "$RUN" --manifest "$TEST_MANIFEST" --split "$SPLIT" \
    --out "$OUT/predict" --refine "${REFINE:-full}" --transforms none --quiet
  LESIONS_CSV=()
  COHORT_DIR=$(dirname "$TEST_MANIFEST")
  [ -f "$COHORT_DIR/lesions.csv" ] && LESIONS_CSV=(--synthetic-lesions "$COHORT_DIR/lesions.csv")
  "$PYTHON" "$HERE/score_cohort_lesions.py" --manifest "$TEST_MANIFEST" --cases "$OUT/predict" \
    "${LESIONS_CSV[@]}" --json "$OUT/table1/table1_predict.json" --markdown "$OUT/table1/table1_predict.md" \
    --title "#### Table 1 — P1 vs P2 by lesion size, spirs predict --refine ${REFINE:-full}" > /dev/null
fi

# 4. statistics: Wilcoxon SPIRS vs identity per metric, McNemar P1 vs P2 per bin (Holm within each family)
mkdir -p "$OUT/stats"
"$PYTHON" "$HERE/stats.py" --registration "$OUT/evaluate/per_pair.csv" \
  --metrics lncc_affine lncc_deformable dice_affine dice_deformable \
  --lesions "$OUT/evaluate/per_lesion.csv" --out "$OUT/stats/evaluate_stats.json" > "$OUT/stats/evaluate_stats.txt"
"$PYTHON" "$HERE/stats.py" --registration "$OUT/evaluate/per_pair_segmentation.csv" --reference P2 \
  --metrics dice_global brats_dice brats_hd95 --out "$OUT/stats/segmentation_stats.json" \
  > "$OUT/stats/segmentation_stats.txt"

# 5. Figure 5: SPIRS vs ANTs vs VoxelMorph
VXM_ARGS=(--vxm-steps 0)
if [ -n "${VXM_WEIGHTS:-}" ]; then
  VXM_ARGS=(--vxm-weights "$VXM_WEIGHTS")
elif [ -n "$TRAIN_MANIFEST" ] && [ "$VXM_STEPS" -gt 0 ]; then
  VXM_ARGS=(--vxm-steps "$VXM_STEPS" --train-manifest "$TRAIN_MANIFEST" --train-split train
            --train-limit "$TRAIN_LIMIT")
fi
PASSES_ARGS=(--affine-passes "${NET_PASSES:-3}")
[ "${NET_SYMMETRIC:-on}" = on ] && PASSES_ARGS+=(--affine-symmetric)
"$PYTHON" "$HERE/compare_registration.py" --run "$RUN" --manifest "$TEST_MANIFEST" --split "$SPLIT" \
  --limit "${LIMIT:-$COMPARE_LIMIT}" --ants "$ANTS" "${VXM_ARGS[@]}" "${PASSES_ARGS[@]}" --out "$OUT/figure5"
"$PYTHON" "$HERE/stats.py" --registration "$OUT/figure5/registration.csv" \
  --metrics lncc_affine lncc_deformable dice_affine dice_deformable folding_percent \
  --out "$OUT/stats/figure5_stats.json" > "$OUT/stats/figure5_stats.txt"

# 6. Table 3: with and without the pyramid (proxy: the finest level alone, same weights)
"$PYTHON" "$HERE/ablation_pyramid.py" "${COMMON[@]}" --out "$OUT/table3"

# 7. Figure 4 I/J: LNCC per pyramid level, on each level's grid and with each level's transform at the finest grid
"$PYTHON" "$HERE/pyramid_levels.py" "${COMMON[@]}" --out "$OUT/figure4"

# 8. Figures 6 and 7: qualitative panels (baseline warps from step 5)
"$PYTHON" "$HERE/examples.py" "${COMMON[@]}" --compare "$OUT/figure5" --out "$OUT/examples"

{
  for part in evaluate table1/table1.md table1/table1_predict.md figure5 table3 figure4 examples; do
    f="$OUT/$part"; [ -d "$f" ] && f="$f/results.md"
    [ -f "$f" ] || continue
    [ "$part" = table1/table1.md ] && echo "#### Table 1 — P1 vs P2 by lesion size" && echo
    cat "$f"; echo
  done
  for s in evaluate_stats segmentation_stats figure5_stats; do
    echo "#### $s"; echo; echo '```'; cat "$OUT/stats/$s.txt"; echo '```'; echo
  done
} > "$OUT/RESULTS_snippets.md"
echo "make_results.sh: done → $OUT/RESULTS_snippets.md"
