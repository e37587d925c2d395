"""T5 (v1.0 and v1.1) with Top-k MLPs, laid out like T5X."""
