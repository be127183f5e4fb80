"""The layout planner: memory (``model.params.memory_estimate_gb``) and predicted step time of
parallel layouts, from the config and its ``cluster`` section alone (``--plan``, ``--dry-run``).

Its functions take the root ``Config``: a layout's cost reads most of it (model, moe, parallel,
train, data and cluster sections), and the search builds whole configs of candidate layouts.
"""
