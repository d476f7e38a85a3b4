"""`tools/bench_speed.py` reports the best of its repeats and when, how and under what
load it measured (its absl flags would clash with kdml.train's in this process: it is
imported in a subprocess, without TensorFlow)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHECK = r"""
import datetime, itertools, json, os, sys, time
sys.path.insert(0, "tools")
import bench_speed

# perf_counter readings around three runs: 2.0 s, 0.5 s, 1.0 s
clock = iter([10.0, 12.0, 20.0, 20.5, 30.0, 31.0])
time.perf_counter = lambda: next(clock)
calls = []
rate = bench_speed.best_rate(lambda: calls.append(1), 100, 3)
os.getloadavg = lambda: (3.25, 1.5, 0.75)
line = bench_speed.measurement_conditions(3, 60, datetime.datetime(2026, 12, 4, 18, 5,
                                          tzinfo=datetime.timezone.utc))
print(json.dumps({"rate": rate, "calls": len(calls), "line": line}))
"""


def test_best_of_repeats_and_the_conditions_line():
    result = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["calls"] == 3 and out["rate"] == 100 / 0.5  # the fastest of the three runs
    line = out["line"]
    assert line.startswith("2026-12-04 18:05 UTC; best of 3 timed runs of 60 steps")
    assert f"{os.cpu_count()} logical CPUs" in line
    assert line.endswith("load average (1, 5, 15 min) 3.25, 1.50, 0.75")
