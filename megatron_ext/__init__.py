"""megatron-core MoE pretraining with Drop-Upcycling (see README.md).

The package's first import hooks megatron-core's, so that every process importing megatron-core
through this package skips ~3 s of start-up it never uses (platform/mcore_import.py).
"""

from megatron_ext.platform import mcore_import

mcore_import.install()
