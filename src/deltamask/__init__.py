"""deltamask: federated fine-tuning of vision foundation models by communicating mask deltas."""

import os as _os
import sys as _sys

# Same seed, same machine -> the same bits (resume, Flower parity, golden payloads). Intel MKL (torch's CPU
# BLAS) picks code paths by the memory alignment of its operands on AVX-512 CPUs, so two identical runs in
# one process could differ in the last bits of the trained scores (seen on an Intel Xeon; not on AMD, where
# MKL takes its AVX2 path). MKL's conditional numerical reproducibility fixes that on every CPU; it must be
# set before torch loads MKL. A value the user set is kept.
if "torch" not in _sys.modules:
    _os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
