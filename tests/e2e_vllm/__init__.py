"""Real vLLM engines end to end (``./dev e2e``)."""
