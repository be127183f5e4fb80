"""The command-line tools: one module per tool, each ``main(argv=None) -> int`` (``platform.cli``
``run_cli``: one-line errors, the shared exit codes), parsing arguments and calling the library.

Each runs as a console script (``[project.scripts]`` in pyproject.toml) and as
``python -m megatron_ext.cli.<module>``; ``tools/`` keeps thin scripts under the old paths.

=====================  ===============================  =========================================
console script         module                           what
=====================  ===============================  =========================================
moe-pretrain           pretrain                         training (also ``pretrain_moe.py``)
moe-upcycle            upcycle                          dense -> MoE (Drop-Upcycling, baselines)
moe-hf-to-mcore        hf_to_mcore                      HF directory -> our checkpoint
moe-mcore-to-hf        mcore_to_hf                      our checkpoint -> HF directory
moe-preprocess         preprocess                       text/JSONL -> megatron .bin/.idx
moe-train-tokenizer    train_tokenizer                  byte-level BPE tokenizer
moe-routing            routing                          expert routing by domain
moe-loss-curves        loss_curves                      loss curves of several runs
moe-lm-eval            lm_eval                          lm-evaluation-harness tasks
moe-generate           generate                         text generation
moe-compare-inits      compare_inits                    the paper's comparison of initializations
moe-parity             parity                           whole-run parity against the paper's stack
=====================  ===============================  =========================================

The top layer of the import contract: nothing in megatron_ext imports it.
"""
