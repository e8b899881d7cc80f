"""The benchmark scripts keep working: every bench_*.py module runs at smoke size."""

from benchmarks import run_all


def test_every_benchmark_runs_at_smoke_size(capsys):
    names = run_all.modules()
    assert len(names) >= 7 and "bench_nearest" in names
    assert run_all.main(["--smoke"]) == 0
    assert f"all {len(names)} benchmarks ran" in capsys.readouterr().out
