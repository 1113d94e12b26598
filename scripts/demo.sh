#!/usr/bin/env bash
# The quick start's main job: sets up a virtual environment with fastpt built
# from this checkout, then runs `fastpt demo` on the built-in corpus (the Python
# documentation). Extra arguments go to `fastpt demo` (e.g. --batch 64).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
env_dir="${FASTPT_DEMO_ENV:-$root/.venv-demo}"
source "$root/scripts/_venv.sh"
fastpt_venv "$env_dir"
"$env_dir/bin/python" -m pip install -q "$root[hf]"
"$env_dir/bin/fastpt" demo "$@"
