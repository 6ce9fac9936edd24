"""Layer 3: what a run optimises and renders: cameras, the scene contract (``base``) and the NeRF
(``nerf/``, ``nerf_scene``).
"""
