"""Throughput benchmarks: ratios measured side by side in one process (not tests)."""
