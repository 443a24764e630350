"""The diffusion model: U-Net, noise schedule and samplers, MNIST data, training, baseline weights files."""
