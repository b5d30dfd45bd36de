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
