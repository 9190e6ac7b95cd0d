#!/usr/bin/env bash
# GPU acceptance check (issue 14): run on a machine with one CUDA GPU, from the repository root:
#
#     bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter
#
# No download. Steps, each ending with one summary line (also collected at the end):
#   1. gpu-tests   pytest -m gpu (cuML vs torch probe backends, other GPU-only tests)
#   2. bench-gpu   benchmarks/bench_gpu.py: images/s and MFU, ViT-B/16, ConvNeXt-B, ViT-7B
#   3. checkpoints random-weight DINOv3 checkpoints saved locally: ViT-B/16-shaped and
#                  ViT-7B-shaped (bf16, sharded safetensors)
#   4. extract-b16 `embedkit extract` of generated demo data with the ViT-B/16 checkpoint, 224 px
#   5. extract-7b  the same with the 7B checkpoint through the sharded safetensors loading path,
#                  512 px, bf16, --auto-batch
#   6. probes      linear (12 Cs over DINOv2's range, validation choice, refit) and kNN probes on 200,000 x 4,096
#                  float16 features on the GPU, backend torch and backend cuml, and their ratio
# On a machine without a CUDA GPU it says so and exits 0 (a dry check).
# Logs and artefacts go to $GPU_CHECK_DIR (default: a new temporary directory).
set -uo pipefail

PY=${PYTHON:-python}
cd "$(dirname "$0")/.." || exit 1

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); dry check, nothing run."
    exit 0
fi

WORK=${GPU_CHECK_DIR:-$(mktemp -d -t embedkit-gpu-check-XXXXXX)}
mkdir -p "$WORK"
SUMMARY=()
FAILED=0
START=$(date +%s)

# step NAME COMMAND...: run with its log in $WORK/NAME.log; its last "SUMMARY " line (or its tail)
# becomes the step's summary line.
step() {
    local name=$1
    shift
    local t0 t1 rc line
    t0=$(date +%s.%N)
    "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    line=$(grep '^SUMMARY ' "$WORK/$name.log" | tail -n 1 | cut -c9-)
    [ -z "$line" ] && line=$(tail -n 1 "$WORK/$name.log")
    line=$(printf '%-12s %s  (%s s, exit %d)' "$name" "$line" "$(awk "BEGIN{printf \"%.0f\", $t1 - $t0}")" "$rc")
    echo "$line"
    SUMMARY+=("$line")
    [ "$rc" -ne 0 ] && FAILED=1
    return 0
}

gpu_tests() {
    "$PY" -m pytest -q -m gpu tests
    local rc=$?
    echo "SUMMARY $(tail -n 1 "$WORK/gpu-tests.log" 2>/dev/null)"
    return $rc
}

bench_gpu() {
    "$PY" benchmarks/bench_gpu.py --steps 10 | tee "$WORK/bench_gpu.out"
    local rc=${PIPESTATUS[0]}
    echo "SUMMARY $(grep -iE 'mfu' "$WORK/bench_gpu.out" | tr -s ' ' | paste -sd ';' | cut -c1-400)"
    return $rc
}

checkpoints() {
    "$PY" - "$WORK" <<'EOF'
import sys, time, torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

work = sys.argv[1]
shapes = {
    "vitb16": dict(num_register_tokens=4),
    "vit7b16": dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                    intermediate_size=8192, use_gated_mlp=True, num_register_tokens=4),
}
for name, kw in shapes.items():
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(**kw)
    with torch.device("meta"):
        model = DINOv3ViTModel(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # buffers (RoPE) are not saved: rebuilt when loaded
            p.normal_(0.0, 0.02)
    model.save_pretrained(f"{work}/{name}", max_shard_size="2GB", safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    print(f"SUMMARY {name}: {n / 1e9:.2f} B params saved to {work}/{name} "
          f"in {time.perf_counter() - t0:.0f} s")
EOF
}

demo_data() {
    "$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path
import yaml
from embedkit.data.demo import DemoSpec
from embedkit.manifest.loader import load_manifest
from embedkit.study.demodata import demo_dataset_config, ensure_demo_data

work = Path(sys.argv[1])
cfg = demo_dataset_config()
cfg["images"], cfg["index"] = str(work / "demo" / "images"), str(work / "demo" / "index.csv")
(work / "manifest.yaml").write_text(
    yaml.safe_dump({"cache": str(work / "cache"), "datasets": {"demo": cfg}})
)
manifest = load_manifest(work / "manifest.yaml")
ensure_demo_data(manifest.dataset("demo"), DemoSpec(n_patients=100, images_per_patient=3, size=1024))
print(f"SUMMARY demo data: 300 images of 1024 px in {work / 'demo'}")
EOF
}

extract() {  # extract CHECKPOINT RESOLUTION EXTRA...: the CLI in-process, then images/s, memory
    local ckpt=$1 res=$2
    shift 2
    "$PY" - "$WORK" "$ckpt" "$res" "$@" <<'EOF'
import sys, time, torch
from embedkit.cli import app

work, ckpt, res, *extra = sys.argv[1:]
args = ["extract", "--model", f"{work}/{ckpt}", "-d", "demo", "-r", res,
        "-m", f"{work}/manifest.yaml", "--device", "cuda", "--dtype", "bf16", "--overwrite", *extra]
t0 = time.perf_counter()
try:
    app(args, standalone_mode=False)
finally:
    wall = time.perf_counter() - t0
    print(f"SUMMARY {ckpt} at {res} px {' '.join(extra)}: 300 images in {wall:.0f} s = "
          f"{300 / wall:.1f} images/s including load; peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
EOF
    local rc=$? log="$WORK/extract-${ckpt#vit}.log"
    # The CLI's own throughput / MFU line joins the summary.
    echo "SUMMARY $(grep '^SUMMARY ' "$log" | tail -n 1 | cut -c9-); $(grep 'throughput:' "$log" | tail -n 1)"
    return $rc
}

probes() {
    "$PY" - <<'EOF'
import time, numpy as np, torch
from embedkit.probes import KNNProbe, LogisticProbe

n, d, labels = 200_000, 4096, 14
rng = np.random.default_rng(0)
X = np.empty((n, d), np.float16)
for lo in range(0, n, 8192):
    X[lo:lo + 8192] = rng.standard_normal((min(8192, n - lo), d), dtype=np.float32)
W = rng.standard_normal((d, labels)).astype(np.float32) * (rng.random((d, labels)) < 0.02)
Y = np.concatenate([(X[lo:lo + 8192].astype(np.float32) @ W > 1.0) for lo in range(0, n, 8192)])
Y = Y.astype(np.float32)
mask = rng.random(Y.shape) > 0.05
tr, va = slice(0, 180_000), slice(180_000, n)
Cs = np.logspace(-6, 5, 12)  # the DINOv2 range at 12 points: both backends fit the 6-minute budget
walls = {}
for backend in ("torch", "cuml"):
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    kw = {"device": "cuda"} if backend == "torch" else {"backend": "cuml"}
    lin = LogisticProbe(Cs=Cs, **kw).fit_select(X[tr], Y[tr], mask[tr], X[va], Y[va], mask[va])
    t1 = time.perf_counter()
    knn = KNNProbe(k=(10, 20), **kw).fit(X[tr], Y[tr], mask=mask[tr])
    knn.predict_proba_per_k(X[va])
    t2 = time.perf_counter()
    walls[backend] = (t1 - t0, t2 - t1)
    print(f"{backend}: linear {t1 - t0:.0f} s (C {lin.C_:.3g}), knn {t2 - t1:.0f} s, peak GPU "
          f"memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
(lt, kt), (lc, kc) = walls["torch"], walls["cuml"]
print(f"SUMMARY 200000 x 4096 float16: linear torch {lt:.0f} s / cuml {lc:.0f} s "
      f"(cuml/torch {lc / lt:.2f}x), knn torch {kt:.0f} s / cuml {kc:.0f} s ({kc / kt:.2f}x)")
EOF
}

"$PY" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(0), '; logs in $WORK')"
step gpu-tests gpu_tests
step bench-gpu bench_gpu
step checkpoints checkpoints
step demo-data demo_data
step extract-b16 extract vitb16 224
step extract-7b16 extract vit7b16 512 --auto-batch
step probes probes

echo
echo "gpu_check summary ($(($(date +%s) - START)) s; logs in $WORK):"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
exit $FAILED
