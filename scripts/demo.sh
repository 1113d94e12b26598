#!/usr/bin/env bash
# The quick start's main job: sets up a virtual environment with fastpt built
# from this checkout, then runs `fastpt demo`: preprocess the Python installation's
# own documentation, pre-train a BERT-Mini MLM for a few minutes, evaluate it against
# the same encoder from scratch. Extra arguments go to `fastpt demo` (e.g. --minutes 10).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
env_dir="${FASTPT_DEMO_ENV:-$root/.venv-demo}"
source "$root/scripts/_venv.sh"
fastpt_venv "$env_dir"
"$env_dir/bin/python" -m pip install -q "$root[logs]"
"$env_dir/bin/fastpt" demo "$@"
