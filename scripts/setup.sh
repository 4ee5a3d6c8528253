#!/usr/bin/env bash
# Set up ram-trl in ./.venv (idempotent; safe to re-run on an existing venv).
#
#   bash scripts/setup.sh          # library + TRL integration + plotting
#   bash scripts/setup.sh --dev    # ... + pytest, hypothesis, ruff and DeepSpeed (for the test-suite)
#
# torch is installed first, pinned, and only when the venv cannot import it: letting pip resolve an
# open "torch>=2.1" into an empty venv would pull a multi-GB CUDA build, and an existing torch (CPU,
# CUDA or a local build) is never replaced. Works from any directory; exports nothing.
set -euo pipefail

TORCH_VERSION="2.13.0"
DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument: $arg (use --dev or --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
PIP=(".venv/bin/python" -m pip --disable-pip-version-check --quiet --quiet)  # -qq: errors only

step() { printf '[setup] %s\n' "$*"; }

if [[ ! -x "$PY" ]]; then
  step "creating .venv with $(command -v python3)"
  python3 -m venv .venv
fi

step "upgrading pip"
"${PIP[@]}" install --upgrade pip

# Read torch's version from its metadata: importing it before numpy is installed prints warnings.
TORCH_META='from importlib.metadata import version; print(version("torch"))'

if "$PY" -c "import torch" >/dev/null 2>&1; then
  step "keeping installed torch $("$PY" -c "$TORCH_META")"
else
  step "installing torch==${TORCH_VERSION}"
  "${PIP[@]}" install "torch==${TORCH_VERSION}"
fi

if [[ "$DEV" == 1 ]]; then
  EXTRAS="trl,plot,dev"
else
  EXTRAS="trl,plot"
fi
# Pin the torch that is now installed, so that no dependency can make pip replace it.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$("$PY" -c "$TORCH_META")" >"$CONSTRAINTS"

step "installing ram-trl in editable mode with extras [${EXTRAS}]"
"${PIP[@]}" install -c "$CONSTRAINTS" -e ".[${EXTRAS}]"

if [[ "$DEV" == 1 ]]; then
  step "installing deepspeed (DS_BUILD_OPS=0: ops are JIT-built on first use)"
  DS_BUILD_OPS=0 "${PIP[@]}" install -c "$CONSTRAINTS" deepspeed
fi

step "done: ram-trl $("$PY" -c 'import ram_trl; print(ram_trl.__version__)'), torch $("$PY" -c "$TORCH_META")"
