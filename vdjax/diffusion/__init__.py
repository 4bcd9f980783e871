"""Noise schedules, timestep spacings and the DDIM update as pure JAX functions (plus the jitted sampler loop)."""
