"""Checkpoint formats: Hugging Face (safetensors) <-> our megatron-core checkpoints.

A layer above ``megatron_ext.checkpoint`` (the training state: save, verify, resume, load into a
model), which it uses to read and write our side; nothing below imports it.

* ``keymaps``: the declarative key tables (Llama, Mixtral; ``{layer}``/``{expert}`` templates),
  the architecture (``Arch``) read from an HF ``config.json``;
* ``hf_io``: HF directories read lazily tensor by tensor, and written in shards;
* ``mcore_io``: our checkpoints read and written as plain state dicts, tensor by tensor;
* ``hf_models``: transformers' reference models for the logit comparisons;
* ``convert``: HF -> megatron and megatron -> HF, directory to directory, validated.
"""
