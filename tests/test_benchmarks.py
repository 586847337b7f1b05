"""Benchmark scripts are run by hand, so nothing else notices when a change breaks one."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_script_imports_and_entry_points_show_help(script: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    if 'if __name__ == "__main__":' in script.read_text():
        assert "usage" in result.stdout.lower()


def test_a_pair_alternates_its_order_and_shows_the_round_with_the_median_ratio() -> None:
    sys.path.insert(0, str(BENCHMARKS[0].parent))
    try:
        import run  # noqa: PLC0415 - the benchmarks folder is not a package
        from servers import Load  # noqa: PLC0415
    finally:
        sys.path.pop(0)
    calls: list[str] = []
    ceilings = iter([100.0, 100.0, 100.0])
    mine = iter([70.0, 90.0, 60.0])  # the secledger run of each round, in the order run

    def measured(name: str, rates: Any) -> Callable[[str], tuple[Load, int]]:
        def one(stamp: str) -> tuple[Load, int]:
            calls.append(f"{name}-{stamp.rsplit('-', 1)[1]}")
            return Load(measured=int(next(rates)), window=1.0), 0

        return one

    bench = SimpleNamespace(args=SimpleNamespace(rounds=3))
    pair = run.pair(bench, ("c", "s"), measured("ceiling", ceilings), measured("mine", mine), "")
    assert calls == ["ceiling-0", "mine-0", "mine-1", "ceiling-1", "ceiling-2", "mine-2"]
    assert [round(r, 2) for r in pair.ratios()] == [0.7, 0.9, 0.6]
    ceiling, shown = pair.median
    assert shown.load.rate == 70.0  # the median round, not the best or the last
    assert shown.ceiling is ceiling.load


def test_cpu_counters_read_this_process_and_grow_with_work() -> None:
    sys.path.insert(0, str(BENCHMARKS[0].parent))
    try:
        import cpu  # noqa: PLC0415 - the benchmarks folder is not a package
    finally:
        sys.path.pop(0)
    me = Path("/proc/self")
    before, (on_cpu, _) = cpu.cpu_seconds(me / "stat"), cpu.schedstat(me / "schedstat")
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after, (on_cpu_after, _) = cpu.cpu_seconds(me / "stat"), cpu.schedstat(me / "schedstat")
    assert 0.2 <= after - before < 5
    assert 0.2 <= on_cpu_after - on_cpu < 5
    busiest = cpu.deltas(
        {1: (1.0, 2.0, 0.5), 2: (0.0, 0.0, 0.0)}, {1: (1.5, 2.4, 0.6), 3: (9, 9, 9)}
    )
    assert len(busiest) == 1  # only ids present in both samples
    assert busiest[0] == pytest.approx((0.5, 0.4, 0.1))
    # The main thread is reported by its id even when another thread is busier.
    main, other = cpu.split_threads(
        {7: (1.0, 1.0, 0.0), 8: (1.0, 1.0, 0.0), 9: (0.0, 0.0, 0.0)},
        {7: (1.2, 1.1, 0.1), 8: (1.9, 1.8, 0.2), 9: (0.1, 0.1, 0.0)},
        7,
    )
    assert main == pytest.approx((0.2, 0.1, 0.1))
    assert other == pytest.approx((0.9, 0.8, 0.2))
    alone, nobody = cpu.split_threads({7: (1.0, 1.0, 0.0)}, {7: (1.5, 1.5, 0.0)}, 7)
    assert alone == pytest.approx((0.5, 0.5, 0.0))
    assert nobody == (0.0, 0.0, 0.0)
