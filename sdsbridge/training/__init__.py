"""Layer 6: the training loop (``loop``), one step (``step``), checkpoints, run directories, the 2D
image mode and the memory forecast.
"""
