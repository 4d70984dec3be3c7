# Sourced by the bench scripts that run llm-compressor and llmquant one run at a time (bench/fp8_time_2026-12-07c/
# pairs.sh, bench/fp8_seeds_2026-12-08/seeds.sh); from the repository's root, with OUT_DIR set (SRC: the llmquant
# source to run, default src; LLMC: llm-compressor's python, scripts/llmcompressor_env.sh's by default).
# A name already in OUT_DIR is skipped, so a rerun resumes.
LLMC=${LLMC:-/tmp/llmc/bin/python}
SRC=${SRC:-src}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT_DIR"
theirs() {  # NAME ARGS...: scripts/compare_llmcompressor.py ARGS into OUT_DIR/llmc_NAME.json
    local name=$1; shift
    [ -f "$OUT_DIR/llmc_$name.json" ] && return
    echo "$(date +%T) llm-compressor $name"
    PYTHONPATH=src "$LLMC" scripts/compare_llmcompressor.py "$@" --out "$OUT_DIR/llmc_$name.json"
}
ours() {  # NAME RECIPE_JSON: scripts/bench_recipe.py's line in OUT_DIR/ours.jsonl
    if [ -f "$OUT_DIR/ours.jsonl" ] && grep -q "\"name\": \"$1\"" "$OUT_DIR/ours.jsonl"; then return; fi
    echo "$(date +%T) llmquant $1"
    PYTHONPATH=$SRC .venv/bin/python scripts/bench_recipe.py "$1" "$2" --quiet --out "$OUT_DIR/ours.jsonl"
}
