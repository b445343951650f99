"""Running the real (slim) Triton on our model repository."""
