"""Benchmark code behind tools/benchmark_*.py (decoder training speed, evaluator timing)."""
