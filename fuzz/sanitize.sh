#!/bin/sh
# make sanitize: build machipc/_unix.pyx with AddressSanitizer into a temp dir and
# run the hostile/fuzz/soak tests (C transport) and the fuzzer under it.
set -eu
PY=${VPY:-.venv/bin/python}
TMP=$(mktemp -d /tmp/machipc-asan.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
LIBASAN=$(${CC:-gcc} -print-file-name=libasan.so)
mkdir -p "$TMP/lib"
cp -r machipc "$TMP/lib/"
rm -f "$TMP"/lib/machipc/*.so
CFLAGS="-fsanitize=address -fno-omit-frame-pointer -O1 -g" LDFLAGS="-fsanitize=address" \
    $PY setup.py -q build_ext --build-lib "$TMP/lib" --build-temp "$TMP/build" >/dev/null 2>&1
export PYTHONPATH="$TMP/lib" LD_PRELOAD="$LIBASAN"
# CPython itself "leaks" at exit by design: leak detection off, everything else on.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:print_summary=1"
$PY -P -c 'import machipc._unix as u, sys; print("ASan build:", u.__file__); assert sys.argv[1] in u.__file__' "$TMP"
$PY -P -m pytest -q -p no:cacheprovider -k "c-transport or c]" \
    tests/test_hostile.py tests/test_faults.py tests/test_soak.py tests/test_fuzz_client.py tests/test_server_client.py
cp -r fuzz/corpus "$TMP/corpus"
$PY -P fuzz/fuzz_recv.py -max_total_time=${FUZZ_SECONDS:-30} "$TMP/corpus" 2>&1 | tail -3
echo "sanitize: no AddressSanitizer report"
