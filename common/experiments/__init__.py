"""Experiments: the poster pipeline, the weight/activation pipeline, the comparisons, sensitivity along
training, the learning curve and the report."""
