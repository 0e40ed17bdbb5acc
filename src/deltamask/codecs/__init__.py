"""Codecs: every byte that crosses the network is produced here.

Import this package to populate the registry; look codecs up with :func:`get_codec`.
"""

from . import dense, exact, fuse  # noqa: F401  (registration side effects)
from . import auto  # noqa: F401  (after the codecs it chooses among)
from . import quant  # noqa: F401  (the baselines' compressors)
from . import rans  # noqa: F401  (the fast exact downlink)
from . import delta  # noqa: F401  (theta against the client's cached version)
from .base import (
    ArrayCodec,
    Codec,
    DeltaCodec,
    IndexCodec,
    KIND_CONTRACTS,
    MaskCodec,
    ProbsCodec,
    available_codecs,
    check_indices,
    codec_for_id,
    codec_of,
    get_codec,
    log2_binomial,
    register,
)
from .container import CodecError

__all__ = [
    "ArrayCodec",
    "Codec",
    "CodecError",
    "DeltaCodec",
    "IndexCodec",
    "KIND_CONTRACTS",
    "MaskCodec",
    "ProbsCodec",
    "available_codecs",
    "check_indices",
    "codec_for_id",
    "codec_of",
    "get_codec",
    "log2_binomial",
    "register",
]
