"""Sweeps: activation patching (denoising and noising) and ablation over layer × pos × head."""

from hookpatch.sweeps._patching import ablation_sweep, patch_sweep

__all__ = ["ablation_sweep", "patch_sweep"]
