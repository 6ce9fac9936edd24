"""sdsbridge: text-to-3D by calibrated score distillation (SDS-Bridge) from a diffusion prior."""

__version__ = "0.1.0"
