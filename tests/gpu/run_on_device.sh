#!/usr/bin/env bash
# Run every TensorRT path of edgemm on THIS machine and print one table.
#
# Needs: an NVIDIA GPU (datacenter or Jetson), TensorRT's Python package, cuda-python of the driver's CUDA
# major (pip install -e '.[dev,tensorrt-cu12]' / '[tensorrt-cu13]' on x86/SBSA; JetPack: TensorRT from
# JetPack plus '.[dev,jetson-cu12]' / '[jetson-cu13]'), trtexec on PATH or in /usr/src/tensorrt/bin for
# the build.sh row.
#
# NOT RUN BY THE EDGEMM DEVELOPERS: this script and tests/gpu/ were written without access to a GPU with
# TensorRT. Please send the table it prints (and the junit file) with any failure.
#
# Usage: bash tests/gpu/run_on_device.sh [OUTPUT_DIR]     (from the repository root or anywhere)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-$(mktemp -d -t edgemm-gpu-XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
cd "$ROOT"

echo "== device"
"$PY" - <<'PY' 2>&1 | tee "$OUT/device.txt"
import importlib, platform
def v(mod):
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "present")
    except Exception as exc:  # noqa: BLE001
        return f"missing ({type(exc).__name__})"
print("python      ", platform.python_version(), platform.machine())
print("tensorrt    ", v("tensorrt"))
bindings = v("cuda.bindings")
print("cuda-python ", v("cuda.cudart") if bindings.startswith("missing") else bindings)
try:
    from edgemm.runtime.tensorrt_session import cuda_device, import_cudart
    err, n = import_cudart().cudaGetDeviceCount()
    for i in range(int(n)):
        print(f"gpu {i}       ", cuda_device(i))
except Exception as exc:  # noqa: BLE001
    print("gpu         ", exc)
PY
for f in /etc/nv_tegra_release; do [ -r "$f" ] && { echo "jetson      $(head -n 1 "$f")"; } done
command -v nvpmodel >/dev/null && echo "nvpmodel    $(nvpmodel -q 2>/dev/null | tr '\n' ' ')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm \
    --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi  /'
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
[ -x "$TRTEXEC" ] && echo "trtexec     $("$TRTEXEC" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1)" \
                  || echo "trtexec     not found (the build.sh row will be skipped)"

echo "== tests (tests/gpu, marked tensorrt/gpu)"
"$PY" -m pytest tests/gpu -q -rA -p no:cacheprovider --junitxml "$OUT/junit.xml" -o junit_family=xunit2 \
    > "$OUT/pytest.log" 2>&1
STATUS=$?
tail -n 5 "$OUT/pytest.log"

echo "== summary"
"$PY" - "$OUT/junit.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

rows = []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
    result, detail = "pass", ""
    for tag in ("failure", "error", "skipped"):
        node = case.find(tag)
        if node is not None:
            result = {"failure": "FAIL", "error": "ERROR", "skipped": "skip"}[tag]
            detail = " ".join((node.get("message") or node.text or "").split())[:90]
    rows.append((name, result, f"{float(case.get('time', 0)):.1f}", detail))
width = max([len(r[0]) for r in rows] + [4])
print(f"{'path':<{width}}  result  seconds  detail")
for r in rows:
    print(f"{r[0]:<{width}}  {r[1]:<6}  {r[2]:>7}  {r[3]}")
PY
echo "(full log: $OUT/pytest.log, junit: $OUT/junit.xml)"
exit "$STATUS"
