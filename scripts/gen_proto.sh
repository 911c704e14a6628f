#!/usr/bin/env bash
# Regenerate the gRPC stubs in translator/proto/ from proto/ (or into $1, for the comparison test).
# `-Itranslator/proto=proto` makes the generated modules import each other as translator.proto.*.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -Itranslator/proto=proto --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" proto/translator/v1/translator.proto
# Package markers, so that setuptools finds the stubs as regular packages.
for d in translator/proto translator/proto/translator translator/proto/translator/v1; do
  : > "$out/$d/__init__.py"
done
