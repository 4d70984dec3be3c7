# Shared by the benchmark scripts (sourced, not run): one recipe by llmquant in its own process, one thread,
# appended to $OUT as one JSON line by scripts/bench_recipe.py; a name already in $OUT is skipped, so a
# rerun resumes where an interrupted one stopped.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

run() {  # NAME RECIPE_JSON [bench_recipe.py options]
    if [ -f "$OUT" ] && grep -q "\"name\": \"$1\"" "$OUT"; then echo "skip $1"; return; fi
    echo "$(date +%T) llmquant $1"
    .venv/bin/python scripts/bench_recipe.py "$@" --out "$OUT"
}
