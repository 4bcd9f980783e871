"""Whole networks: the configurable UNet3D (and, later, the VAE and the text/image encoders)."""
