#!/usr/bin/env bash
# The GPU device check (issue 18): one script for a bare GPU machine, under 8 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT when set, else runs/gpu_check)
#
# Environment:
#   ATSSDET_REFERENCE_DIR  the MegEngine reference folder (default ../shared/reference/megengine). A device
#                          machine gets only the repository, so copy the three files it needs into an ignored
#                          folder of the repo first and point here (see docs/gpu.md, "Running the check"):
#                          atss_res18_coco_3x_800size.seed0.{pkl.gz,outputs.npz} and cat.jpg (37 MB).
#   PYTHON                 interpreter (default python3). Wheels in .whl/ (if any) are installed first,
#                          offline, into /tmp/atssdet-site (torch, torchvision, onnx, onnxruntime, opencv,
#                          safetensors, pytest, tqdm are expected to be there already).
#   BENCH_BUDGET_S         seconds for the benchmark's figures (default 240; later figures are skipped)
#
# Steps: environment, `pytest -m cuda tests/test_gpu.py`, a short AMP training run on synthetic data whose
# loss must fall, torchrun with NCCL (one GPU, DDP), reference parity on the device and the ATSS-R50 vs
# FCOS-R50 benchmark (fp32/bf16/fp16, batch 1 and 8, inference and training images/s, peak memory).
# Writes three files to OUT_DIR: gpu_check.json (every step's status and time, the training checks' and the
# benchmark's figures), gpu_bench.json and gpu_check.log (every step's output); scratch (synthetic data,
# checkpoints) goes to $WORK (default ${TMPDIR:-/tmp}/atssdet-gpu-check), not to OUT_DIR.
# Without CUDA it runs the CPU parts (the CUDA tests, which skip, and a tiny smoke benchmark), says that the
# CUDA parts were skipped, and exits 0. Exit status: 0 when every step that ran passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_check}}
PY=${PYTHON:-python3}
REF=${ATSSDET_REFERENCE_DIR:-../shared/reference/megengine}
WORK=${WORK:-${TMPDIR:-/tmp}/atssdet-gpu-check}
mkdir -p "$OUT_DIR" "$WORK"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/atssdet-site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/atssdet-site"
fi
STEPS="$WORK/steps.tsv"
: >"$STEPS"
START=$SECONDS

step() {  # step NAME COMMAND...: run it, its output appended to gpu_check.log, record "NAME rc seconds"
    local name=$1 t0=$SECONDS rc
    shift
    echo "== $name: $*" | tee -a "$LOG"
    "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    cat "$WORK/$name.log" >>"$LOG"
    tail -n 5 "$WORK/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STEPS"
    echo "== $name: exit $rc after $((SECONDS - t0)) s (total $((SECONDS - START)) s)" | tee -a "$LOG"
}

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
step environment "$PY" -c "import platform, torch, torchvision; print(platform.platform(), 'python', platform.python_version()); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('torchvision', torchvision.__version__); torch.cuda.is_available() and print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**20, 'MiB')"
step cuda_tests env ATSSDET_REFERENCE_DIR="$REF" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_gpu.py
if [ "$CUDA" = 1 ]; then
    step nvidia_smi nvidia-smi
    step amp_training "$PY" benchmarks/gpu_train_check.py amp --amp fp16 --work "$WORK" --out "$WORK/amp_training.json"
    step torchrun_nccl "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
        benchmarks/gpu_train_check.py nccl --out "$WORK/torchrun_nccl.json"
    step benchmark "$PY" benchmarks/gpu_bench.py --reference "$REF" --budget-s "${BENCH_BUDGET_S:-240}" \
        --out "$OUT_DIR/gpu_bench.json"
else
    echo "== CUDA is not available here: skipped the CUDA tests' bodies, the AMP training run, torchrun with NCCL,"
    echo "   parity on the GPU and the GPU benchmark; running the benchmark's CPU smoke instead"
    step benchmark_smoke "$PY" benchmarks/gpu_bench.py --smoke --min-time 0.1 --reference "$REF" \
        --out "$OUT_DIR/gpu_bench.json"
fi

"$PY" - "$OUT_DIR" "$WORK" "$CUDA" "$((SECONDS - START))" <<'EOF'
import json, sys
from pathlib import Path

out, work, cuda, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    steps[name] = {"rc": int(rc), "seconds": int(secs)}
report = {"cuda": cuda, "seconds": seconds, "steps": steps,
          "skipped": [] if cuda else ["cuda_tests (bodies)", "amp_training", "torchrun_nccl", "parity on CUDA", "benchmark"]}
for name, path in (("amp_training", work / "amp_training.json"), ("torchrun_nccl", work / "torchrun_nccl.json"),
                   ("gpu_bench", out / "gpu_bench.json")):
    if path.is_file():
        report[name] = json.loads(path.read_text())
(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
failed = [n for n, s in steps.items() if s["rc"] != 0]
print(f"gpu_check: cuda={cuda}, {len(steps)} steps in {seconds} s, failed: {', '.join(failed) or 'none'}; wrote {out / 'gpu_check.json'}")
sys.exit(1 if failed else 0)
EOF
