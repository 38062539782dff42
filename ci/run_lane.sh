#!/usr/bin/env bash
# Run one CI lane: the tests under the lane's environment, then the conformance check
# (with --expect, so a lane fails if dispatch fell back), then the bench where the lane asks.
# Usage: bash ci/run_lane.sh {cpu|interp|cuda|rocm|npu}
set -euo pipefail
cd "$(dirname "$0")/.."
lane="${1:?usage: ci/run_lane.sh LANE}"
while IFS='=' read -r key value; do export "$key=$value"; done < <(python ci/lane.py env "$lane")
# Ascend images need CANN's environment (ignored elsewhere: the file does not exist)
if [[ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]]; then
  # shellcheck disable=SC1091
  source /usr/local/Ascend/ascend-toolkit/set_env.sh
fi
echo "== lane $lane: device=$LANE_DEVICE expect=$LANE_EXPECT backend=${LANE_BACKEND:-auto}"
pytest_args=(-q -p no:cacheprovider)
if [[ -n "${LANE_PINS:-}" ]]; then
  # the lane's pinned versions over the machine's own, in a virtual environment of its own
  venv="${TMPDIR:-/tmp}/rope-backends-lane-$lane"
  python -m venv "$venv"
  # the calling interpreter's packages (torch, triton, the package itself) stay visible behind the
  # pins: a .pth file, not --system-site-packages, which skips them when that interpreter is itself
  # a virtual environment
  python -c "import sysconfig; print(sysconfig.get_paths()['purelib']); print(sysconfig.get_paths()['platlib'])" \
    > "$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_rope_backends_parent.pth"
  read -r -a pins <<< "$LANE_PINS"
  "$venv/bin/python" -m pip install -q "${pins[@]}"
  "$venv/bin/python" -c "import sys; print('lane $lane pins:', sys.argv[1:])" "${pins[@]}"
  PATH="$venv/bin:$PATH"
  pytest_args+=(-p no:benchmark)  # a newer pytest-benchmark on the machine needs a newer pytest
fi
if [[ -n "${LANE_BACKEND}" ]]; then
  pytest_args+=(--backend "$LANE_BACKEND")
fi
read -r -a test_paths <<< "$LANE_TESTS"
read -r -a own_process <<< "${LANE_OWN_PROCESS:-}"
ignores=()
for path in ${own_process[@]+"${own_process[@]}"}; do ignores+=("--ignore=$path"); done
python -m pytest "${pytest_args[@]}" ${ignores[@]+"${ignores[@]}"} "${test_paths[@]}"
# modules that need a fresh process (the Triton interpreter's, on a GPU lane), one pytest each
for path in ${own_process[@]+"${own_process[@]}"}; do
  python -m pytest "${pytest_args[@]}" "$path"
done
check_args=(check --device "$LANE_DEVICE" --expect "$LANE_EXPECT")
if [[ -n "${LANE_BACKEND}" ]]; then
  check_args+=(--backend "$LANE_BACKEND")
fi
python -m rope_backends "${check_args[@]}"
if [[ "$LANE_BENCH" == "1" ]]; then
  python -m rope_backends bench --device "$LANE_DEVICE" --out bench/results
  if [[ "$LANE_DEVICE" == "npu" ]]; then
    python bench/studies/npu_rotary_mul.py --strict --out bench/results
  fi
fi
