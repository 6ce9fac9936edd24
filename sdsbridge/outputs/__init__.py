"""Layer 7: what a finished run gives: meshes, turntables (``export/``), evaluation, plots, the
report page and output names.
"""
