#!/usr/bin/env bash
# Issue 17: `spirs demo` (default patient, shipped weights) under TensorFlow and under JAX, with and without the
# test-time refinement; prints each run's wall time and the Dice of every written mask, TensorFlow vs JAX.
# Usage: bash experiments/jax_demo_parity.sh [WORK_DIR]   (default runs/jaxpred; needs `spirs` on PATH and jax)
set -euo pipefail
work="${1:-runs/jaxpred}"
mkdir -p "$work" && cd "$work"
export TF_CPP_MIN_LOG_LEVEL=2
for mode in full off; do
  for backend in tensorflow jax; do
    start=$(date +%s.%N)
    KERAS_BACKEND=$backend spirs demo --out "${backend}_$mode" --refine "$mode" --overwrite > "${backend}_$mode.log" 2>&1
    echo "$backend --refine $mode: $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
  done
done
python3 - <<'PY'
import glob, os
import nibabel as nib
for mode in ("full", "off"):
    for f in sorted(glob.glob(f"tensorflow_{mode}/**/*mask*.nii.gz", recursive=True)):
        a = nib.load(f).get_fdata() > 0.5
        b = nib.load(f.replace("tensorflow_", "jax_", 1)).get_fdata() > 0.5
        dice = 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)
        print(f"--refine {mode:4s} {os.path.relpath(f, f'tensorflow_{mode}'):42s} voxels TF {a.sum():6d} "
              f"JAX {b.sum():6d}  Dice {dice:.4f}")
PY
