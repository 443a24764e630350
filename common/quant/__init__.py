"""Quantization: weight formats and the quantized file, eligibility, the poster's strategies, budgeted
allocation, activation quantizers and their calibration, BOPs, execution backends."""
