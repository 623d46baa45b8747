"""`make bench`: every benchmark, one after another, each printing its own table.

.venv/bin/python benchmarks/run_all.py           # data, model, training, post-training vs TRL
.venv/bin/python benchmarks/run_all.py --quick   # the quick variant of each

The side-by-side with TRL (bench_posttrain.py) needs the bench extra (`pip install '.[bench]'`);
without TRL it is skipped with a line saying so.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_data.py", "bench_model.py", "bench_train.py", "bench_posttrain.py"]
NEEDS_TRL = {"bench_posttrain.py"}


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    failed = []
    for name in BENCHES:
        if name in NEEDS_TRL and importlib.util.find_spec("trl") is None:
            print(f"\n===== {name}: skipped (TRL is not installed: pip install '.[bench]') =====", flush=True)
            continue
        args = [sys.executable, str(HERE / name)]
        if quick and name != "bench_data.py":
            args.append("--quick")
        print(f"\n===== {name} =====", flush=True)
        if subprocess.run(args, cwd=HERE.parent).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
