"""LAQFI: Layer-Adaptive Quantization of diffusion models using Fisher Information."""
