#!/usr/bin/env bash
# The test suite: the fast default set, every zoo architecture's 1-round run, then the Flower deployment
# tests (real processes on 127.0.0.1).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pytest -q "$@"
rc=$?
[ $rc -ne 0 ] && exit $rc
# every zoo architecture's 1-round run (tests/model/test_staging.py; the default set runs one per framework),
# and every export format of every zoo family loaded back without deltamask, README's export example (tests/export/)
"$PY" -m pytest -q -m slow -p no:cacheprovider tests/model/test_staging.py tests/export/
rc=$?
[ $rc -ne 0 ] && exit $rc
"$PY" -m pytest -q -m "flower_deploy or (flower and slow)" -p no:cacheprovider
rc=$?
# exit code 5 = no test collected: only acceptable if no deployment test exists in this checkout
if [ $rc -eq 5 ] && ! grep -rq "flower_deploy" tests/ --include='*.py'; then rc=0; fi
exit $rc
