"""pd-sidecar: the reverse proxy in every decode pod that orchestrates P/D stages.

Modules, one concept each:

- ``settings``      flags (llm-d compatible), YAML and environment -> one ``Settings``
- ``app``           wiring: settings -> sessions -> connector -> orchestrator -> servers
- ``routing``       routing header names, ``host:port`` list parsing
- ``api_shapes``    per-path token-cap fields and usage locations
- ``connectors``    registry; ``base`` (the Connector contract), ``nixlv2``,
                    ``shared_storage``, ``sglang``, ``mooncake``
- ``orchestrator``  sends the legs: retries, timeouts, cancellation, failure policy
- ``decode_first``  did a decode-first attempt decline? (pure scanner)
- ``encode``        the encode stage of E/P/D: items, fan-out, merged encoder params
- ``passthrough``   everything that is not P/D, streamed both ways
- ``relay``         chunk-by-chunk response relay, error events after the first byte
- ``usage``         cached-token rewrite for JSON bodies and SSE streams
- ``upstream``      per-stage client sessions, stale pooled connection resend, TLS errors
- ``headers``       hop-by-hop filtering, W3C trace context
- ``tracing``       ``--tracing``: OpenTelemetry request and stage spans
- ``errors``        the error tree (drawn in its docstring)
- ``exchange``      per-request record behind the access log line
- ``health``        readiness probe of the local vLLM
- ``ranks``         data-parallel ranks: port + r serves model-server-port + r
- ``ssrf``          SSRF protection: targets must be pool members (rules, pool, file)
- ``tls``           serving certificate (rotated live), per-stage client TLS
- ``metrics``, ``log``  Prometheus series, JSON logging
"""
