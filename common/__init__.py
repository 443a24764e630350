"""LAQFI: Layer-Adaptive Quantization of diffusion models using Fisher Information.

Packages in pipeline order; each imports only from those listed before it (``tests/test_layout.py``):

* ``core``        config, budgets, errors, storage, locks, CLI helpers; imports nothing of ours
* ``diffusion``   the U-Net, noise schedule and samplers, MNIST, training, baseline weights files
* ``quant``       weight formats and the quantized file, eligibility, poster strategies, allocation,
                  activation quantizers, calibration, BOPs, execution backends
* ``importance``  weight Fisher, the other importance metrics, activation Fisher (they price formats,
                  so they sit above ``quant``)
* ``evaluation``  metrics, evaluation of one variant, sample grids, sampling from stored files
* ``experiments`` the poster pipeline, the W/A pipeline, the comparisons, sensitivity, learning curve, report

Modules directly in ``common/`` are command-line entry points (``python -m common.report``); nothing imports them.
"""
