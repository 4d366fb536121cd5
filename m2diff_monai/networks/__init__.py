"""Networks: IDDPM blocks, M2Diff and its ablations, the MFdiff network, and the config factory.

``build_network(config)`` is the entry point used by bundles, engines and ``m2diff-infer``; see ``docs/networks.md``.
"""

from .blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedding,
    TimestepEmbedSequential,
    UNetDecoder,
    UNetEncoder,
    Upsample,
    timestep_embedding,
)
from .factory import (
    M2DIFF_DEFAULTS,
    PRESETS,
    build_m2diff,
    build_network,
    count_parameters,
    register_network,
    registered_networks,
    resolve_m2diff_config,
)
from .m2diff import (
    OUTPUT_MODES,
    VARIANTS,
    IDDPMUNet,
    M2DiffUNet,
    SingleTaskUNet,
    build_m2diff_variant,
    resolve_mri_available,
)

__all__ = [
    "AttentionBlock",
    "Downsample",
    "ResBlock",
    "TimestepEmbedding",
    "TimestepEmbedSequential",
    "UNetDecoder",
    "UNetEncoder",
    "Upsample",
    "timestep_embedding",
    "M2DIFF_DEFAULTS",
    "PRESETS",
    "build_m2diff",
    "build_network",
    "count_parameters",
    "register_network",
    "registered_networks",
    "resolve_m2diff_config",
    "OUTPUT_MODES",
    "VARIANTS",
    "IDDPMUNet",
    "M2DiffUNet",
    "SingleTaskUNet",
    "build_m2diff_variant",
    "resolve_mri_available",
]
