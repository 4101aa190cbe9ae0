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
#
# Machines without network (an offline GPU machine with its own Python and CUDA PyTorch):
#
#   bash tools/setup_env.sh --download-wheels DIR [--python-version 3.12]   # with network
#   PYTHON=/path/to/python3 bash tools/setup_env.sh --install-from DIR      # offline
#
# --download-wheels puts into DIR every wheel the project needs except torch, torchvision and
# numpy (the machine's own are kept), pip and setuptools included: binary wheels for CPython
# X.Y on manylinux x86_64, pure ones built from source where PyPI has no wheel, the retagged
# sal-detectron2 (unless DCNV2_D2_WHEEL=0) and DIR/requirements.txt. DCNV2_WHEELS_SKIP="name ..." leaves more out
# (packages the target machine already has).
# --install-from installs from DIR with pip --no-index into $PYTHON itself (no venv), pip first,
# keeping its torch, torchvision and numpy, then this package (editable, no dependencies).
#   DETECTRON2_SRC     a detectron2 source folder: built and installed with the machine's nvcc
#                      (set TORCH_CUDA_ARCH_LIST, e.g. 9.0, and MAX_JOBS as usual)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${DCNV2_VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
D2_FALLBACK="sal-detectron2==0.7.2"
# detectron2 (sal 0.7.2 and upstream alike) imports pkg_resources, which setuptools 81 removed,
# without declaring it: model_zoo fails to import without this pin in the environment.
SETUPTOOLS_PIN="setuptools<81"

log() { printf '[setup] %s\n' "$*"; }
die() { printf 'setup_env.sh: error: %s\n' "$*" >&2; exit 2; }

# The runtime dependencies of detectron2 and dcnv2, with their own dependencies spelled out
# (downloads use --no-deps, so that no numpy or torch comes along). Versions: detectron2's
# pins (fvcore<0.1.6, iopath<0.1.10, omegaconf<2.4; hydra 1.3 needs antlr4 4.9).
OFFLINE_SDIST_ONLY="fvcore==0.1.5.post20221221 iopath==0.1.9 antlr4-python3-runtime==4.9.3"
OFFLINE_WHEELS="pip $SETUPTOOLS_PIN opencv-python-headless yacs termcolor omegaconf==2.3.0
  hydra-core==1.3.2 tabulate cloudpickle portalocker tqdm pyyaml pycocotools packaging
  typing_extensions pillow matplotlib contourpy cycler fonttools kiwisolver pyparsing
  python-dateutil six tensorboard tensorboard-data-server absl-py markdown werkzeug markupsafe
  grpcio protobuf"
OFFLINE_REQUIREMENTS="$SETUPTOOLS_PIN opencv-python-headless fvcore iopath yacs termcolor
  omegaconf hydra-core tabulate cloudpickle tqdm pycocotools pillow matplotlib tensorboard"

skipped() {  # $1: a requirement; true when its name is in DCNV2_WHEELS_SKIP
  case " ${DCNV2_WHEELS_SKIP:-} " in *" ${1%%[<=>]*} "*) return 0 ;; esac; return 1
}

# Retag sal-detectron2's cp310 wheel (pure Python apart from a _C that cannot load on other
# Pythons) as py3-none-any, without the binary and without its numpy<2 pin (detectron2's
# Python sources run on numpy 2). $1: the Python to run, $2: the downloaded wheel.
retag_sal_wheel() {
  "$1" - "$2" <<'PYEOF'
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
        elif name.endswith(".dist-info/METADATA"):
            data = re.sub(rb"Requires-Dist: numpy<2", b"Requires-Dist: numpy", data)
        zout.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append(f"{name},sha256={digest},{len(data)}")
    zout.writestr(record_name, "\n".join(records + [f"{record_name},,"]) + "\n")
os.replace(tmp, dst)
PYEOF
  rm -f "$2"
}

download_wheels() {  # $1: folder, $2: Python version (X.Y)
  local dir="$1" pyver="$2" py="$PYTHON" names=() name
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  for name in $OFFLINE_SDIST_ONLY; do skipped "$name" || names+=("$name"); done
  if [ ${#names[@]} -gt 0 ]; then
    log "building pure-Python wheels of ${names[*]}"
    "$py" -m pip wheel --disable-pip-version-check -q --no-deps -w "$dir" "${names[@]}"
  fi
  names=()
  for name in $OFFLINE_WHEELS; do skipped "$name" || names+=("$name"); done
  log "downloading wheels for CPython $pyver manylinux x86_64: ${names[*]}"
  "$py" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version "$pyver" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "${names[@]}"
  if [ "${DCNV2_D2_WHEEL:-1}" != "0" ]; then
    log "downloading $D2_FALLBACK (retagged py3-none-any)"
    "$py" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
      --python-version 3.10 "$D2_FALLBACK" -d "$dir"
    retag_sal_wheel "$py" "$dir"/sal_detectron2-0.7.2-cp310-none-any.whl
  fi
  : > "$dir/requirements.txt"
  for name in $OFFLINE_REQUIREMENTS; do
    skipped "$name" || echo "$name" >> "$dir/requirements.txt"
  done
  log "done: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
}

install_from() {  # $1: folder made by --download-wheels
  local dir="$1" py="$PYTHON"
  [ -f "$dir/requirements.txt" ] || die "$dir/requirements.txt not found (make the folder with --download-wheels)"
  local pip=("$py" -m pip install --disable-pip-version-check -q --no-index --find-links "$dir")
  if ls "$dir"/pip-*.whl >/dev/null 2>&1; then
    "${pip[@]}" --upgrade pip
  else
    log "warning: no pip wheel in $dir: keeping $("$py" -m pip --version | cut -d' ' -f1-2)" \
      "(a pip older than 24 may not build detectron2 with --no-build-isolation)"
  fi
  log "installing $(tr '\n' ' ' < "$dir/requirements.txt")from $dir into $("$py" -c 'import sys; print(sys.prefix)') (keeping its torch, torchvision, numpy)"
  "${pip[@]}" -r "$dir/requirements.txt"
  if [ -n "${DETECTRON2_SRC:-}" ]; then
    [ -f "$DETECTRON2_SRC/setup.py" ] || die "DETECTRON2_SRC=$DETECTRON2_SRC has no setup.py"
    log "building detectron2 from $DETECTRON2_SRC (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<torch default>}, MAX_JOBS=${MAX_JOBS:-<all cores>})"
    "${pip[@]}" --no-deps --no-build-isolation "$DETECTRON2_SRC"
  elif "$py" -c "import detectron2" >/dev/null 2>&1; then
    log "detectron2 already importable: keeping it"
  elif ls "$dir"/sal_detectron2-*.whl >/dev/null 2>&1; then
    log "installing the Python sources of detectron2 ($D2_FALLBACK, no compiled ops)"
    "${pip[@]}" --no-deps "$dir"/sal_detectron2-*.whl
  else
    log "warning: no detectron2 (set DETECTRON2_SRC, or download with DCNV2_D2_WHEEL=1)"
  fi
  log "installing dcnv2 (editable, no dependencies)"
  local pip_log
  pip_log="$(mktemp)"
  if ! "${pip[@]}" --no-deps --no-build-isolation -e "$ROOT" 2>"$pip_log"; then
    # An older setuptools without the wheel package cannot build editable installs offline:
    # a .pth file puts the package on the path all the same.
    local purelib
    purelib="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$ROOT/projects" > "$purelib/dcnv2-source.pth"
    log "editable install unavailable here ($(grep -m 1 -i "error: " "$pip_log" | sed 's/^ *//')); added $purelib/dcnv2-source.pth"
  fi
  rm -f "$pip_log"
}

MODE="" MODE_DIR="" PY_VERSION=""
while [ $# -gt 0 ]; do
  case "$1" in
    --download-wheels) MODE=download; MODE_DIR="${2:?--download-wheels needs a folder}"; shift 2 ;;
    --install-from) MODE=install; MODE_DIR="${2:?--install-from needs a folder}"; shift 2 ;;
    --python-version) PY_VERSION="${2:?--python-version needs X.Y}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
    *) die "unknown argument $1 (expected --download-wheels DIR [--python-version X.Y] or --install-from DIR)" ;;
  esac
done
if [ "$MODE" = download ]; then
  download_wheels "$MODE_DIR" "${PY_VERSION:-$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
  exit 0
elif [ "$MODE" = install ]; then
  [ -d "$MODE_DIR" ] || die "--install-from: no folder $MODE_DIR"
  install_from "$MODE_DIR"
  "$PYTHON" -c "import dcnv2" 2>/dev/null || export PYTHONPATH="$ROOT/projects${PYTHONPATH:+:$PYTHONPATH}"
  PY="$PYTHON"
  if "$PY" - <<'PYEOF'
import torch, torchvision
from dcnv2.layers import available_backends
try:
    import detectron2
    from detectron2 import _C  # noqa: F401
    d2 = f"{detectron2.__version__} (compiled ops loaded)"
except ImportError as e:
    d2 = f"compiled ops not loaded ({e})"
print(f"[setup] done: torch {torch.__version__} (CUDA {torch.cuda.is_available()}), "
      f"torchvision {torchvision.__version__}, detectron2 {d2}, "
      f"backends: {', '.join(available_backends())}")
PYEOF
  then :; else log "warning: $PY cannot import torch, torchvision and dcnv2 together yet"; fi
  exit 0
fi
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
  wheel_dir="$(mktemp -d)"
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version 3.10 "$D2_FALLBACK" -d "$wheel_dir"
  retag_sal_wheel "$PY" "$wheel_dir"/sal_detectron2-0.7.2-cp310-none-any.whl
  # fvcore and iopath are imported by detectron2 but missing from the wheel's metadata.
  pip_install "$wheel_dir"/sal_detectron2-0.7.2-py3-none-any.whl fvcore iopath
  rm -rf "$wheel_dir"
fi

# 3. this package, editable, with test extras. Skipped when setup.py has not changed since the
#    last successful install (the stamp records the hash of setup.py and of this script).
stamp="$VENV/.dcnv2-setup-stamp"
want="$(cat "$ROOT/setup.py" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1) $ROOT"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && has dcnv2; then
  log "dcnv2 already installed (editable) from $ROOT"
else
  log "installing dcnv2 (editable, with test extras)"
  pip_install -e "$ROOT[test]" "$SETUPTOOLS_PIN"
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
versions = {d.metadata["Name"].lower(): d.version for d in md.distributions()}
print("  " + ", ".join(f"{n} {versions.get(n, '-')}"
                      for n in ("numpy", "opencv-python-headless", "setuptools", "pip")))
print(f"  deformable-conv backends: {', '.join(available_backends())}")
PYEOF
log "activate with: source ${VENV#"$ROOT"/}/bin/activate"
