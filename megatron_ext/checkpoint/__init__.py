"""Training state: megatron-core distributed checkpoints of a run and everything that makes them
safe to resume from.

* ``store``: save, commit (atomic rename, ``latest``), prune, verify, find the newest resumable
  checkpoint, load (model, optimizer, scheduler, RNG) and load weights only;
* ``plan``: the one decision a job makes about the checkpoint it starts from (``ResumePlan``),
  verified by the ranks together and consumed by the loaders;
* ``saver``: synchronous and background (async) saves for the training loop;
* ``manifest``: per-file sizes and xxh3 checksums (``meta.json``) and their verification;
* ``safe_pickle``: the allow-list every pickle in a checkpoint is read through;
* ``resume_check``: whether a config may resume a checkpoint (the fields that change the run);
* ``load_model``: one of our checkpoints into a model for evaluation (no optimizer). It reads
  the training state and knows nothing of other formats, so it lives here, below both
  ``conversion`` (its validation) and ``evaluation`` (lm-eval, generation) that use it.

Formats of other stacks (Hugging Face) are ``megatron_ext.conversion``, a layer above.
"""
