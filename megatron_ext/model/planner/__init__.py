"""The layout planner: memory (``model.params.memory_estimate_gb``) and predicted step time of
parallel layouts, from the config and its ``cluster`` section alone (``--plan``, ``--dry-run``).
"""
