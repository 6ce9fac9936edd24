"""Test fixtures shipped with the package (offline users' tests import them too): the random tiny
Stable Diffusion pipeline (``random_sd``) and headless Chromium (``browser``). Nothing at runtime imports
them.
"""
