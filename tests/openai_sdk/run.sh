#!/bin/sh
# tests/openai_sdk/run.sh - the OpenAI SDK compatibility test (CTest:
# openai_sdk_compat).  Installs the pinned SDK with `npm ci` when
# node_modules is missing or older than package-lock.json (the npm registry
# is needed once), then runs sdk_test.mjs with node's test runner against
# $KDKIT serve --toy (sdk_test.mjs), and kdkit teacher ask beside the SDK
# against one recorded-response server (replay_test.mjs).
set -eu
cd "$(dirname "$0")"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "openai_sdk_compat: node and npm are required (scripts/install-deps.sh installs them)" >&2
  exit 1
fi
stamp=node_modules/.package-lock.json
if [ ! -f "$stamp" ] || [ package-lock.json -nt "$stamp" ]; then
  npm ci --no-audit --no-fund --loglevel=error >&2
fi
echo "openai SDK $(node -p 'require("./node_modules/openai/package.json").version'), node $(node --version)"
exec node --test --test-reporter=spec sdk_test.mjs replay_test.mjs
