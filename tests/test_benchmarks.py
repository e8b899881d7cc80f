"""The benchmark scripts keep working: every bench_*.py module runs at smoke size."""

from benchmarks import run_all


def test_every_benchmark_runs_at_smoke_size(capsys):
    assert run_all.main(["--smoke"]) == 0
    assert "all 7 benchmarks ran" in capsys.readouterr().out
