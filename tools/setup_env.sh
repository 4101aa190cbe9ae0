#!/usr/bin/env bash
# One-command set-up for dcnv2: a virtual environment in .venv with torch, torchvision,
# detectron2 and this package (editable, with its test extras).
#
#   bash tools/setup_env.sh
#
# Idempotent: a second run checks what is there, installs nothing new and prints the summary.
# Environment overrides:
#   PYTHON             interpreter used to create the venv (default: python3)
#   DCNV2_VENV         where the venv lives (default: .venv at the repository root)
#   TORCH_SPEC         pip requirement(s) for torch/torchvision when none is importable
#                      (default: "torch==2.14.1 torchvision==0.29.1", the versions this
#                      project is tested with; the package itself accepts any torch>=2.1)
#   DCNV2_SYSTEM_SITE  =1 creates the venv with --system-site-packages, so a detectron2
#                      (and torch) that you built from source stays visible in it
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${DCNV2_VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
D2_FALLBACK="sal-detectron2==0.7.2"
CACHE="$ROOT/.cache/setup"
mkdir -p "$CACHE"

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  venv_args=()
  if [ "${DCNV2_SYSTEM_SITE:-0}" = "1" ]; then venv_args+=(--system-site-packages); fi
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# 1. torch + torchvision: keep what is importable (for example a CUDA build chosen by the user).
if has "torch, torchvision"; then
  log "torch/torchvision already installed: keeping them"
else
  log "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  pip_install $TORCH_SPEC
fi

# 2. detectron2: keep an importable one (the normal case on GPU machines: built from source,
#    with its CUDA ops). Otherwise install sal-detectron2, a packaged copy of detectron2's Python
#    sources. Its only wheel is tagged cp310; it is pure Python apart from a _C extension that
#    simply does not load on other Pythons (detectron2 tolerates that), so retag it py3.
if has detectron2; then
  log "detectron2 already importable: keeping it"
else
  log "detectron2 not importable: installing $D2_FALLBACK (Python sources of detectron2)"
  wheel_dir="$CACHE/wheels"
  mkdir -p "$wheel_dir"
  if ! ls "$wheel_dir"/sal_detectron2-0.7.2-py3-none-any.whl >/dev/null 2>&1; then
    "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
      --python-version 3.10 "$D2_FALLBACK" -d "$wheel_dir"
    # Retag as py3-none-any and drop the cp310 binary (it cannot load on other Pythons).
    "$PY" - "$wheel_dir"/sal_detectron2-0.7.2-cp310-none-any.whl <<'PYEOF'
import base64, hashlib, os, re, sys, zipfile
src = sys.argv[1]
dst = src.replace("-cp310-none-any.whl", "-py3-none-any.whl")
records, tmp = [], dst + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    for name in zin.namelist():
        if name == record_name or re.search(r"_C\.cpython-.*\.so$", name):
            continue
        data = zin.read(name)
        if name.endswith(".dist-info/WHEEL"):
            data = re.sub(rb"Tag: .*", b"Tag: py3-none-any", data)
            data = data.replace(b"Root-Is-Purelib: false", b"Root-Is-Purelib: true")
        zout.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append(f"{name},sha256={digest},{len(data)}")
    zout.writestr(record_name, "\n".join(records + [f"{record_name},,"]) + "\n")
os.replace(tmp, dst)
PYEOF
  fi
  # fvcore and iopath are imported by detectron2 but missing from the wheel's metadata.
  pip_install "$wheel_dir"/sal_detectron2-0.7.2-py3-none-any.whl "numpy<2" fvcore iopath
fi

# 3. this package, editable, with test extras. Skipped when setup.py has not changed since the
#    last successful install (the stamp records the hash of setup.py and of this script).
stamp="$VENV/.dcnv2-setup-stamp"
want="$(cat "$ROOT/setup.py" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1) $ROOT"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && has dcnv2; then
  log "dcnv2 already installed (editable) from $ROOT"
else
  log "installing dcnv2 (editable, with test extras)"
  # numpy<2 stays pinned here: detectron2 0.6/0.7 need it, and without the constraint the
  # resolver takes numpy 2 for onnx's ml_dtypes.
  pip_install -e "$ROOT[test]" "numpy<2"
  echo "$want" > "$stamp"
fi

"$PY" - <<'PYEOF'
import importlib.metadata as md
import torch, torchvision, detectron2, dcnv2
from dcnv2.layers import available_backends
try:
    from detectron2 import _C  # noqa: F401
    d2c = "compiled ops loaded"
except ImportError:
    d2c = "no compiled ops (CPU-only Python sources)"
print("[setup] done:")
print(f"  python       {__import__('sys').version.split()[0]}")
print(f"  torch        {torch.__version__} (CUDA available: {torch.cuda.is_available()})")
print(f"  torchvision  {torchvision.__version__}")
print(f"  detectron2   {detectron2.__version__} from {detectron2.__path__[0]} ({d2c})")
print(f"  dcnv2        {md.version('dcnv2')} from {dcnv2.__path__[0]}")
print(f"  deformable-conv backends: {', '.join(available_backends())}")
PYEOF
log "activate with: source ${VENV#"$ROOT"/}/bin/activate"
