"""What the EPP, the pd-sidecar and the simulator share, owned by none of them.

The wire contract both sides must agree on (routing header names, multimodal part
types, Go duration syntax) and the plumbing both run (watched YAML files, TLS material,
process metrics, the Kubernetes InferencePool watcher). Nothing here imports ``epp``,
``sidecar`` or ``vllm_sim``.
"""
