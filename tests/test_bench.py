"""bench/throughput.py keeps working: a smoke-sized run end to end (its figures mean nothing)."""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_throughput_bench_prints_its_speedups_and_writes_its_record(tmp_path):
    record_path = tmp_path / "record.json"
    result = subprocess.run(
        [sys.executable, "bench/throughput.py", "--preset", "smoke", "--workers", "1", "--json", str(record_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"speedup data=([\d.]+) step=([\d.]+) end_to_end=([\d.]+)", last)
    assert match, last
    record = json.loads(record_path.read_text())
    for name, shown in zip(("data", "step", "end_to_end"), match.groups(), strict=True):
        fast, baseline = record[name]["fast"]["images_per_s"], record[name]["baseline"]["images_per_s"]
        assert fast > 0 and baseline > 0
        assert float(shown) == round(fast / baseline, 2)
    loss = record["end_to_end"]["loss"]
    steps = record["end_to_end"]["steps"] + record["end_to_end"]["warmup_steps"]
    assert len(loss["fast"]) == len(loss["baseline"]) == steps
    assert all(0 < value < 10 for value in loss["fast"] + loss["baseline"])
    assert record["gflop_per_image"] > 0 and record["eval"]["seconds"] > 0
    assert 0 <= record["eval"]["knn_acc"] <= 1
