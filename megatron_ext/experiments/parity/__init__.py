"""The whole-run parity against the paper's training stack (moe-parity, megatron_ext/cli/parity.py):
``pipeline`` makes the checkpoints and runs ours (pretrain_moe.py) and theirs, ``reference`` is
the paper's loop (transformers' Mixtral, torch AdamW, moe-recipes' schedule, DeepSpeed's gradient
handling) rebuilt from its facts, ``report`` compares them against the stated tolerance."""
