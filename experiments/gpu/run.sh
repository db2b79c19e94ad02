#!/usr/bin/env bash
# The GPU machine's one command: install the carried wheels, check the environment, run the recipe.
#
#   bash experiments/gpu/run.sh [recipe.py options]     # in the repository root, with OUT set
#
# Needs .whl/ (experiments/gpu/download_wheels.sh) carried along; see experiments/gpu/README.md for the
# exact device call. KERAS_BACKEND defaults to jax (the machine has no TensorFlow). The recipe's wall
# budget (--budget, default 540 s) counts from this script's start. WHEELS=0 skips the wheels (on a
# machine that has Keras, nibabel and nilearn installed), PYTHON picks the interpreter (default python3).
set -uo pipefail
T0=$(date +%s.%N)
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
if [ "${WHEELS:-1}" != 0 ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "run.sh: installing .whl/ failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  echo "run.sh: not installing .whl/ (absent, or WHEELS=0); using the installed packages" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi -L 2>/dev/null || echo "run.sh: nvidia-smi found no GPU" >&2
# fail in seconds, not minutes, when a package is missing or broken
"$PYTHON" -c "import keras, nibabel, optree; from nilearn import datasets; import spirs_tf.networks
print('run.sh: keras', keras.__version__, 'backend', keras.backend.backend())" \
  || { echo "run.sh: the Python environment is incomplete (see above)" >&2; exit 4; }
exec "$PYTHON" experiments/gpu/recipe.py --out "$OUT" --t0 "$T0" "$@"
