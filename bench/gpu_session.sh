#!/usr/bin/env bash
# The work of one GPU session in one command, stage by stage, each time-boxed; logs to OUT_DIR.
#   smoke   a few calls of every kind against the reference (stops the rest when it fails)
#   cuda    tests/test_cuda.py (triton vs eager on CUDA tensors, graphs, no sync); CUDA_TESTS adds files
#   tune    python -m rope_backends tune (the tile table goes to the user cache and OUT_DIR)
#   study   bench/studies/triton_kernel.py (casts, launch paths)
#   bench   python -m rope_backends bench --device cuda (all groups but rope_index; BENCH_ARGS adds options)
#   sample  python -m rope_backends check --device cuda --expect triton (the sample tier)
#   fuzz    the long hypothesis profile, ROPE_FUZZ_EXAMPLES per op, the three ops side by side
#   integration  bench/studies/integration_llama.py (a 1B Llama-shaped model with and without the patch)
#   rope_index   bench/studies/rope_index.py --quick on cuda
# Usage: STAGES=smoke,cuda,tune,bench bash bench/gpu_session.sh OUT_DIR
#   PACK=1  leave OUT_DIR.tgz instead of OUT_DIR (a lent device returns only a few files per call)
# Peers: carry Liger-Kernel on PYTHONPATH; ROPE_BENCH_FLASH_ATTN_ROTARY=path/to/flash_attn/ops/triton/rotary.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: STAGES=... bench/gpu_session.sh OUT_DIR}"
stages=",${STAGES:-smoke,cuda,tune,bench},"
py="${PYTHON:-python3}"
for flag in PACK; do  # 0 or 1, nothing else
  [[ ${!flag:-0} =~ ^[01]$ ]] || { echo "$flag: expected 0 or 1, got '${!flag}'" >&2; exit 2; }
done
mkdir -p "$out"
pack() { if [[ ${PACK:-0} == 1 ]]; then tar czf "$out.tgz" -C "$out" . && rm -rf "$out"; fi; }
trap pack EXIT
export PYTHONUNBUFFERED=1
status=0
run() {  # run NAME LIMIT_S CMD...: log to OUT_DIR/NAME.txt, print its tail
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-25}" "$out/$name.txt"
  [[ $rc == 0 ]] || status=1
  return $rc
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$out/device.txt" 2>&1
"$py" -m rope_backends info > "$out/info.txt" 2>&1
if [[ $stages == *,smoke,* ]]; then
  run smoke 300 "$py" - <<'EOF' || { echo "smoke failed: the other stages are not run"; exit 1; }
import torch, rope_backends as rb
from rope_backends import reference
from rope_backends.spec import Layout, RopeArgs
from rope_backends.testing.check import bitwise_mismatches
bad = 0
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for layout in ("neox", "interleaved"):
        x = torch.randn(3, 300, 24, 128, device="cuda").to(dtype)
        cos, sin = rb.cos_sin(torch.arange(300, device="cuda"), 128)
        for inplace in (False, True):
            for _ in range(2):  # the full path, then the prepared runner
                xi = x.clone()
                out = rb.apply(xi, cos[:, None], sin[:, None], layout=layout, inplace=inplace)
                want = reference.run(RopeArgs((x,), False, Layout(layout), 128, cos=cos[:, None], sin=sin[:, None]))[0]
                bad += bool(bitwise_mismatches(out, want).any())
        qkv = torch.randn(37, 48 * 128, device="cuda").to(dtype)
        ref = qkv.clone()
        pos = torch.randint(0, 4096, (37,), device="cuda")
        cache = rb.cos_sin_cache(4096, 128, device="cuda")
        rb.apply_cached(qkv[:, :4096], qkv[:, 4096:5120], pos, cache, layout=layout, head_dim=128)
        want = reference.run(RopeArgs((ref[:, :4096].view(37, 32, 128), ref[:, 4096:5120].view(37, 8, 128)), False,
                                      Layout(layout), 128, positions=pos, cache=cache))
        bad += bool(bitwise_mismatches(qkv[:, :4096].reshape(37, 32, 128), want[0]).any())
        bad += bool(bitwise_mismatches(qkv[:, 4096:5120].reshape(37, 8, 128), want[1]).any())
print("smoke:", "OK" if not bad else f"{bad} calls differ from the reference")
raise SystemExit(1 if bad else 0)
EOF
fi
if [[ $stages == *,cuda,* ]]; then
  # shellcheck disable=SC2086
  run cuda 400 "$py" -m pytest -q -p no:cacheprovider --device cuda ${CUDA_TESTS:-tests/test_cuda.py} -rf --tb=short
fi
if [[ $stages == *,tune,* ]]; then
  TAIL=40 run tune 420 "$py" -m rope_backends tune --jobs "${TUNE_JOBS:-12}" ${TUNE_ARGS:-}
  cp ~/.cache/rope_backends/triton-tiles/*.json "$out/" 2>/dev/null
fi
if [[ $stages == *,study,* ]]; then
  run study 240 "$py" bench/studies/triton_kernel.py --out "$out" ${STUDY_ARGS:-}
fi
if [[ $stages == *,bench,* ]]; then
  TAIL=120 run bench 560 "$py" -m rope_backends bench --device cuda --groups diffusion,qk,llm,mrope,backward,dispatch \
    --out "$out" --no-plot ${BENCH_ARGS:-}
fi
if [[ $stages == *,sample,* ]]; then
  run sample 400 "$py" -m rope_backends check --device cuda --expect triton
fi
if [[ $stages == *,fuzz,* ]]; then
  for op in apply apply_qk apply_cached; do
    HYPOTHESIS_PROFILE=long ROPE_FUZZ_EXAMPLES="${ROPE_FUZZ_EXAMPLES:-100}" timeout -s INT "${FUZZ_LIMIT:-400}" \
      "$py" -m pytest -q -p no:cacheprovider --device cuda "tests/test_fuzz.py::test_fuzz_${op}" -rf --tb=short \
      > "$out/fuzz_$op.txt" 2>&1 &
  done
  wait
  for op in apply apply_qk apply_cached; do echo "== fuzz $op"; tail -n 5 "$out/fuzz_$op.txt"; done
fi
if [[ $stages == *,integration,* ]]; then
  run integration 200 "$py" bench/studies/integration_llama.py --out "$out"
fi
if [[ $stages == *,rope_index,* ]]; then
  run rope_index 150 "$py" bench/studies/rope_index.py --quick --devices cuda --out "$out"
fi
exit $status
