"""The DDPM noise schedule and the timestep buckets that Fisher strata and activation ranges share.

Notation follows Ho et al. 2020 (DDPM): beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s,
timesteps are 0-based (t = 0 .. T-1).
"""
import torch


class NoiseSchedule:
    """Linear beta schedule; all derived tensors computed once (float64 then cast)."""

    def __init__(self, timesteps: int, beta_start: float, beta_end: float):
        self.timesteps = timesteps
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        self.betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.alpha_bar = alpha_bar.float()
        self.sqrt_alpha_bar = alpha_bar.sqrt().float()
        self.sqrt_one_minus_alpha_bar = (1.0 - alpha_bar).sqrt().float()

    @classmethod
    def from_config(cls, diffusion_cfg):
        return cls(diffusion_cfg.timesteps, diffusion_cfg.beta_start, diffusion_cfg.beta_end)

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps  (DDPM eq. 4)."""
        a = self.sqrt_alpha_bar.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        s = self.sqrt_one_minus_alpha_bar.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return a * x0 + s * eps

    def p_losses(self, model, x0, t, eps, min_snr_gamma=None):
        """Simple DDPM objective ||eps - eps_theta(x_t, t)||^2 (mean over all elements).

        ``min_snr_gamma``: weight each sample by min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t)
        (Hang et al. 2023, "Min-SNR weighting"), a training recipe that converges faster; None is the plain
        objective (the one Fisher information is defined on).
        """
        per_sample = (model(self.q_sample(x0, t, eps), t) - eps).pow(2).flatten(1).mean(1)
        if min_snr_gamma is None:
            return per_sample.mean()
        ab = self.alpha_bar.to(x0.device)[t]
        snr = ab / (1 - ab)
        return (per_sample * snr.clamp(max=min_snr_gamma) / snr).mean()


def bucket_edges(T: int, K: int) -> list:
    """[(first t, last t)] of the K timestep buckets b = t*K // T (ceil edges: exact when K does not divide T)."""
    return [(-(-k * T // K), -(-(k + 1) * T // K) - 1) for k in range(K)]
