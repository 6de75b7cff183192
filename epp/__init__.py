"""The Endpoint Picker: an Envoy ext_proc server that routes LLM requests for P/D."""
