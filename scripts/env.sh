# Sourced by the scripts: one target directory outside the clone, reused
# across clones and runs (llama.cpp and tract take ~16 minutes cold on 2 cores),
# and one cargo profile (release) for tests, benchmarks and packaging.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/airgate/target}"
mkdir -p "$CARGO_TARGET_DIR"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
AIRGATE_BIN="$CARGO_TARGET_DIR/release/airgate"
export AIRGATE_BIN
