#!/usr/bin/env bash
# Everything the suite can check on one CUDA/ROCm machine, in parallel processes, in one call:
#   - the sample tier (`check --device cuda`: every backend serving cuda, each case twice: the
#     full path, then the dispatcher's prepared runner), with --expect triton;
#   - the exhaustive tier (`check --full --backend triton`), split over $SHARDS processes
#     (--shard k/N, whole kernel groups per shard): compiling its ~2,200 kernel variants is the
#     CPU-bound part, each process does its own; NAMES=FILE limits it to the cases FILE names;
#   - the long hypothesis profile ($ROPE_FUZZ_EXAMPLES, default 400 per op, tensors up to 2**20 elements), one
#     process per op.
# Usage: bash bench/gpu_conformance.sh OUT_DIR [SHARDS] [TIME_LIMIT_S]  (the limit is per stage:
# the sample tier, then the shards and the fuzz side by side)
#   SAMPLE=0   skip the sample tier (already run this session: on the H200 the shards alone need
#              the whole of a 600 s call; 14 shards: 8 done and 6 at 294-387 of their cases at 430 s)
#   PACK=1     leave OUT_DIR.tgz instead of OUT_DIR (a lent device returns only a few files per call)
# Logs go to OUT_DIR; the summary (one line per process and every failure) is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bench/gpu_conformance.sh OUT_DIR [SHARDS] [TIME_LIMIT_S]}"
shards="${2:-12}"
py="${PYTHON:-python3}"
limit="${3:-460}"  # H100, 12 shards: the sample tier ~100 s, the slowest shard 443 s
examples="${ROPE_FUZZ_EXAMPLES:-400}"  # per op: most compile a new specialisation (~1 s each)
names=()  # NAMES=FILE: the exhaustive tier's shards run only the cases FILE names (check --names)
if [[ -n "${NAMES:-}" ]]; then names=(--names "$NAMES"); fi
for flag in PACK SAMPLE; do  # 0 or 1, nothing else
  [[ ${!flag:-0} =~ ^[01]$ ]] || { echo "$flag: expected 0 or 1, got '${!flag}'" >&2; exit 2; }
done
mkdir -p "$out"
pack() { if [[ ${PACK:-0} == 1 ]]; then tar czf "$out.tgz" -C "$out" . && rm -rf "$out"; fi; }
trap pack EXIT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/device.txt" 2>/dev/null || true
"$py" -m rope_backends info > "$out/info.txt" 2>&1

status=0
# the sample tier first and alone: it holds the two >2**31-element cases of every backend, ~20 GiB
# each, which side by side with the shards' own large cases ran the 80 GB GPU out of memory
if [[ ${SAMPLE:-1} == 1 ]]; then
  timeout "$limit" "$py" -m rope_backends check --device cuda --expect triton > "$out/sample.txt" 2>&1
  rc=$?; echo "sample $rc" > "$out/exit_codes.txt"; [[ $rc == 0 ]] || status=1
else
  echo "skipped (SAMPLE=0)" > "$out/sample.txt"; : > "$out/exit_codes.txt"
fi
pids=(); names_of=()
for ((k = 0; k < shards; k++)); do
  timeout "$limit" "$py" -m rope_backends check --device cuda --backend triton --full --shard "$k/$shards" \
    ${names[@]+"${names[@]}"} --max-failures 100 > "$out/full_$k.txt" 2>&1 & pids+=($!); names_of+=("full_$k")
done
for op in apply apply_qk apply_cached; do
  # SIGINT at the limit: pytest still prints its summary
  HYPOTHESIS_PROFILE=long ROPE_FUZZ_EXAMPLES="$examples" timeout -s INT "$limit" "$py" -m pytest -q \
    -p no:cacheprovider --device cuda --hypothesis-show-statistics "tests/test_fuzz.py::test_fuzz_${op}" \
    -rf --tb=short > "$out/fuzz_$op.txt" 2>&1 & pids+=($!); names_of+=("fuzz_$op")
done
for i in "${!pids[@]}"; do
  # 124 (or 130 for the fuzz's SIGINT): the time limit ended it
  wait "${pids[$i]}"; rc=$?; echo "${names_of[$i]} $rc" >> "$out/exit_codes.txt"; [[ $rc == 0 ]] || status=1
done

echo "== device: $(cat "$out/device.txt" 2>/dev/null)"
echo "== non-zero exits: $(awk '$2 != 0' "$out/exit_codes.txt" | tr '\n' ' ')"
echo "== sample tier"; tail -n 12 "$out/sample.txt"
echo "== full tier ($shards shards)"
for ((k = 0; k < shards; k++)); do
  # the table row when it finished, else the last progress line (cut short by the time limit)
  printf 'shard %2d: ' "$k"; grep -E '^(triton|eager|npu) |progress:' "$out/full_$k.txt" | tail -n 1 | tr -s ' '
  grep -E '^\s+(\[|FAIL)' "$out/full_$k.txt" | head -n 5
done
for op in apply apply_qk apply_cached; do
  echo "== fuzz $op"; grep -E 'passed|failed|Error|Falsifying|RopeCase\(|reproduce_failure|passing examples|Interrupted' "$out/fuzz_$op.txt" | tail -n 8
done
exit "$status"
