#!/usr/bin/env bash
# Regenerates the committed Python stubs in epp/_proto from protos/*.proto.
# Usage: protos/generate.sh [python]   (defaults to the project's .venv python)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${1:-.venv/bin/python}"
OUT=epp/_proto
# The well-known types (struct, any, ...) ship inside grpcio-tools.
WKT="$("$PYTHON" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

"$PYTHON" -m grpc_tools.protoc \
    -I protos -I "$WKT" \
    --python_out="$OUT" --pyi_out="$OUT" \
    protos/disagg_extproc.proto
echo "generated: $(ls "$OUT"/disagg_extproc_pb2.py*)"
