"""Importance: the weight Fisher diagonal, the other importance metrics (cost per tensor and format), and
the activation Fisher."""
