"""Measuring code shared by the benchmark scripts next to this package (tools/bench/*.py) and by
the tests: training-step throughput against transformers' Mixtral, the LM-loss head, activation
memory, report output. Not part of the installed library: it imports transformers' Mixtral and
serves only benchmarks. Scripts import it as ``benchlib`` (their own directory is on sys.path when
run as ``python tools/bench/X.py``); tests as ``tools.bench.benchlib`` (the repository root is on
their sys.path). Modules here import each other relatively, so both names work.
"""
