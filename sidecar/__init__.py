"""pd-sidecar: the reverse proxy in every decode pod that orchestrates P/D stages."""
