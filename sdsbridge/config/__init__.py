"""Layer 2: the typed config schema (``schema``) and loading config files (``loader``).
"""
