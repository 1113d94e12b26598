# Sourced by the scripts: creates (or reuses) a virtual environment with the
# pinned torch and triton. On this project's CPU machines `torch==2.13.0` resolves
# to a local CPU wheel; elsewhere set FASTPT_TORCH_SPEC (e.g. "torch>=2.4").
# Usage: fastpt_venv DIR
fastpt_venv() {
  local dir="$1"
  local py="${PYTHON:-python3}"
  if [ ! -x "$dir/bin/python" ]; then
    "$py" -m venv "$dir"
  fi
  "$dir/bin/python" -m pip install -q --upgrade pip
  "$dir/bin/python" -m pip install -q "${FASTPT_TORCH_SPEC:-torch==2.13.0}" "${FASTPT_TRITON_SPEC:-triton==3.8.0}"
}
