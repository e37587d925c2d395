"""Vision Transformer with Top-k MLPs."""
