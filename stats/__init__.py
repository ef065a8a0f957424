"""The statistics stage of covedit: per-layer key second moments Σ k kᵀ, collected in one pass, stored in zarr."""
