"""Layer 8: sweeps: sweep files (``sweep_file``), the worker that runs one run, local/Ray/Slurm launchers.
"""
