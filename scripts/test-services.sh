#!/usr/bin/env bash
# Installs and starts what the test suite talks to besides what the tests start themselves:
# dcmtk and Orthanc (third-party DICOM peers) and PostgreSQL (the production store). Idempotent.
set -euo pipefail
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
command -v chromium >/dev/null || need+=(chromium)
{ command -v Orthanc || [ -x /usr/sbin/Orthanc ]; } >/dev/null || need+=(orthanc)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  else
    echo "please install: ${need[*]} (sudo apt-get install ${need[*]})" >&2; exit 1
  fi
fi
bash "$(dirname "$0")/postgres.sh"
# The upstream EHR stand-in for the writeback tests: Medplum's FHIR router (npm, Node >= 20.19)
command -v node >/dev/null && command -v npm >/dev/null || {
  [ "$(id -u)" = 0 ] || { echo "please install Node.js 20 and npm" >&2; exit 1; }
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm
}
upstream="$(dirname "$0")/../tests/upstream_fhir"
lock_sum="$(sha1sum "$upstream/package-lock.json" | cut -c1-12)"
if [ "$(cat "$upstream/node_modules/.medbridge-lock" 2>/dev/null)" != "$lock_sum" ]; then
  (cd "$upstream" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$lock_sum" > "$upstream/node_modules/.medbridge-lock"
fi
# The OpenID provider of the access-control tests: panva's oidc-provider (npm)
provider="$(dirname "$0")/../tests/oidc_provider"
provider_sum="$(sha1sum "$provider/package-lock.json" | cut -c1-12)"
if [ "$(cat "$provider/node_modules/.medbridge-lock" 2>/dev/null)" != "$provider_sum" ]; then
  (cd "$provider" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$provider_sum" > "$provider/node_modules/.medbridge-lock"
fi
