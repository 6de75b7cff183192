"""The gateway half's public names, and nothing else, are exported."""

from __future__ import annotations

import importlib

import pytest

MODULES = {
    "epp.extproc": {
        "EXTPROC_METHOD",
        "EXTPROC_SERVICE",
        "MAX_CHUNK_BYTES",
        "ROUTING_HEADERS",
        "ExtProcConfig",
        "ExtProcService",
    },
    "epp.settings": {
        "DEFAULT_POOL_GROUP",
        "FLAGS",
        "EppSettings",
        "parse_args",
        "parse_go_bool",
        "parse_quantity",
    },
    "epp.app": {
        "INFERENCE_EXTENSION_SERVICE",
        "LIVENESS_SERVICES",
        "READINESS_SERVICES",
        "EppApp",
        "StartupError",
        "run",
    },
    "epp.tls": {"grpc_cipher_suites"},
    "common.tls": {"CERT_FILE", "KEY_FILE", "CertificatePair", "load_cert_dir", "self_signed"},
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_exports(name: str) -> None:
    module = importlib.import_module(name)
    assert set(module.__all__) == MODULES[name]
    for attr in module.__all__:
        assert getattr(module, attr) is not None


def test_method_path_is_envoys() -> None:
    from epp.extproc import EXTPROC_METHOD

    assert EXTPROC_METHOD == "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
