"""Benchmarks: training-step throughput of our model against reference stacks."""
