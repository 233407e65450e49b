#!/bin/sh
# The PyTorch extension's tests (ctest: python_ops): pytest over tests/python with the first Python that imports
# torch and pytest ($PYTHON, then /usr/bin/python3, then python3 on PATH). Exits 77 (ctest: skipped) when there
# is none. Extra arguments go to pytest.
cd "$(dirname "$0")/../.." || exit 1
for py in ${PYTHON:-} /usr/bin/python3 python3; do
  if "$py" -c "import torch, pytest" >/dev/null 2>&1; then
    "$py" -m pytest -q -p no:cacheprovider tests/python "$@"
    rc=$?
    if [ "$rc" -eq 5 ]; then
      echo "SKIPPED: pytest collected no test"
      exit 77
    fi
    exit "$rc"
  fi
done
echo "SKIPPED: no Python with torch and pytest (apt-get install python3-torch python3-pytest)"
exit 77
