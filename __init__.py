"""covedit: edit facts inside language models with covariance-normalised updates (ROME, MEMIT, AlphaEdit)."""
