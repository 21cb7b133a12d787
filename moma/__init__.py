"""moma: modality-aware sparse models (MoT, MoMa, Mixture-of-Mamba, AGD) in JAX/Flax."""

__version__ = "0.1.0"
