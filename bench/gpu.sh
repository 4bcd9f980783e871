#!/bin/bash
# Issue #7's GPU benchmarks in one command, for a session lent a GPU machine (a bare image with CUDA torch and JAX,
# no network). Each script appends its table to BENCHMARKS.md; the updated file and the logs land in $OUT (or
# bench_out/), so they come back from the machine.
#
#     bash bench/gpu.sh unet vae blocks         # the scripts named (default: unet vae train_step sample)
#
# One device call runs at most 10 minutes: name a few scripts per call (the full-size sample loop with
# torch.compile alone may take several). Each script stops after $TIMEOUT seconds (default 540).
#
# Packages the image lacks travel as wheels in .whl/ (git-ignored; fetched where pip works, Python 3.12 x86-64):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 ml_collections
# and the run carries .whl. Every script checks its outputs against the reference before it reports.
set -o pipefail
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "bench/gpu.sh: no NVIDIA GPU here; on a CPU run the scripts themselves (python bench/unet.py, ...)"; exit 1
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
missing=$(python3 - <<'EOF'
import importlib
names = ["jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "torch", "diffusers", "transformers", "absl"]
print(" ".join(n for n in names if importlib.util.find_spec(n.split(".")[0]) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "missing Python packages: $missing (carry them as wheels in .whl/, see the top of bench/gpu.sh)"; exit 1
fi
out=${OUT:-bench_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
status=0
for name in ${@:-unet vae train_step sample}; do
  extra=""
  [ "$name" = sample ] && extra="--torch-compile"
  echo "== bench/$name.py --size=gpu $extra"
  timeout "${TIMEOUT:-540}" python3 "bench/$name.py" --size=gpu $extra 2>&1 | tee "$out/$name.log" || status=1
done
cp BENCHMARKS.md "$out/"
exit $status
