"""Layer 5: score distillation: the gradient formulas (``formulas``), prompt roles and view
conditions (``prompts``) and the methods (``methods/``, one class each, found by name in their registry).
"""
