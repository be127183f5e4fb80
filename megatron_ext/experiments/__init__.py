"""Experiments built from our real command-line tools, each stage a subprocess.

``compare``: the paper's comparison of MoE initializations (``moe-compare-inits``):
``plan`` turns the arguments into stages (exact commands and the outputs that prove each done),
``runner`` runs the unfinished ones and records them in ``DIR/stages.json``, ``report`` writes
``DIR/report.md``, ``report.json`` and ``curves.png``.
"""
