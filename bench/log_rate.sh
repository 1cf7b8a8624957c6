# Sourced by bench/gpu_bench.sh and bench/compare.sh: how both read a speed.

# The median of the numbers on stdin, one per line; exit status 1 when none.
median() {
    sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) exit 1; print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# The median tokens/s of a JSON-lines training log (the trainers' and the
# PyTorch peer's step records) over its steps after the first two: those make
# the cuBLASLt plans, allocations and, for the compiled peer, the compilation.
log_rate() {
    grep '"type":"step"' "$1" | tail -n +3 | sed 's/.*"tokens_per_s":\([0-9.e+]*\).*/\1/' | median
}
