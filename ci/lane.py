"""Read ci/lanes.toml: `python ci/lane.py matrix` prints the GitHub matrix as JSON;
`python ci/lane.py env LANE` prints `KEY=VALUE` lines (env plus DEVICE/EXPECT/BACKEND/BENCH/EXTRAS/TESTS/
OWN_PROCESS/PINS)."""

from __future__ import annotations

import json
import pathlib
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

LANES = tomllib.loads((pathlib.Path(__file__).parent / "lanes.toml").read_text())["lanes"]


def main(argv: list[str]) -> int:
    if argv[:1] == ["matrix"]:
        include = [{"lane": name, "runs_on": lane["runs_on"], "container": lane["container"]} for name, lane in LANES.items()]
        print(json.dumps({"include": include}))
        return 0
    if len(argv) == 2 and argv[0] == "env":
        if argv[1] not in LANES:
            print(f"lane: expected one of {sorted(LANES)}, got {argv[1]!r}", file=sys.stderr)
            return 2
        lane = LANES[argv[1]]
        for key, value in lane.get("env", {}).items():
            print(f"{key}={value}")
        print(f"LANE_DEVICE={lane['device']}")
        print(f"LANE_EXPECT={lane['expect']}")
        print(f"LANE_BACKEND={lane.get('backend', '')}")
        print(f"LANE_BENCH={int(lane['bench'])}")
        print(f"LANE_EXTRAS={','.join(lane['extras'])}")
        print(f"LANE_TESTS={' '.join(lane.get('tests', ['tests']))}")
        print(f"LANE_OWN_PROCESS={' '.join(lane.get('own_process', []))}")
        print(f"LANE_PINS={' '.join(lane.get('pins', []))}")
        return 0
    print("usage: python ci/lane.py matrix | env LANE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
