"""Evaluation: FID/KID/IS and classifier metrics, paired evaluation of one variant, sample grids, sampling
from stored weights files."""
