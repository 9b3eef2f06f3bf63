"""shark-torchrec: SHARK embedding compression (F-Permutation, F-Quantization) for TorchRec."""

__version__ = "0.1.0"
