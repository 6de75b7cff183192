"""Generated protobuf stubs (protos/generate.sh). Do not edit by hand."""
