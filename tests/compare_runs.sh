# One training run against another, for the shell tests that run the same
# training two ways (tests/test_trainer.sh: micro-batches; tests/test_dist.sh
# and tests/test_emu.sh: ranks, micro-batches, backends). Sourced; the caller
# defines ok and bad (print a verdict, count failures).

# "step loss grad_norm" per step of a trainer log (JSON lines; the log prints
# losses with 6 decimals and gradient norms with 6 significant digits).
run_steps() {
    grep '"type":"step"' "$1" | sed 's/.*"step":\([0-9]*\),"loss":\([0-9.e+-]*\).*"grad_norm":\([0-9.e+-]*\).*/\1 \2 \3/' \
        | sort -n -u
}

# run_close WHAT LOG_A LOG_B CKPT_A CKPT_B STEPS TOL_LOSS TOL_NORM TOL_PARAM TOL_MOM [TOL_BIAS]
# Both logs hold the same STEPS steps, with losses within TOL_LOSS (absolute)
# and gradient norms within TOL_NORM (relative); the checkpoints hold
# biases within TOL_BIAS (max abs; default 0: bit for bit), parameters
# within TOL_PARAM (max abs) and AdamW moments within TOL_MOM (max abs over
# the largest |entry|). A tolerance of 0 asks for identity. Prints the
# measured differences either way.
run_close() {
    local what=$1 la=$2 lb=$3 ca=$4 cb=$5 steps=$6 tl=$7 tn=$8 tp=$9 tm=${10} tb=${11:-0} d
    d=$(join <(run_steps "$la") <(run_steps "$lb") | awk '{ l = $2 - $4; l = l < 0 ? -l : l;
        g = ($3 - $5) / $3; g = g < 0 ? -g : g; if (l > ml) ml = l; if (g > mg) mg = g; n++ }
        END { printf "%d %.1e %.1e", n, ml, mg }')
    set -- $d
    if [ "$1" = "$steps" ] && [ "$(run_steps "$la" | wc -l)" = "$steps" ] \
            && awk -v l="$2" -v g="$3" -v tl="$tl" -v tg="$tn" 'BEGIN { exit !(l <= tl && g <= tg) }'; then
        ok "$what: losses of $steps steps within $2 (tol $tl), gradient norms within $3 relative (tol $tn)"
    else
        bad "$what: $1 of $steps steps; losses differ by $2 (tol $tl), gradient norms by $3 relative (tol $tn):"
        echo "step loss grad_norm | step loss grad_norm"; join <(run_steps "$la") <(run_steps "$lb")
    fi
    "${MOE_BIN_DIR:-.}/moe_ckpt" diff "$ca" "$cb" > "$TMP/run_close.diff" 2>&1
    if awk -v tp="$tp" -v tm="$tm" -v tb="$tb" '$1 == "params" { p = 1; if ($3 > tp) e = 1 } $1 == "bias" { b = 1; if ($3 > tb) e = 1 }
            ($1 == "adam_m" || $1 == "adam_v") && $5 > tm { e = 1 } END { exit e || !p || !b }' "$TMP/run_close.diff"; then
        ok "$what: checkpoints (tol params $tp abs, moments $tm rel, biases $([ "$tb" = 0 ] && echo exact || echo "$tb abs")): $(awk '$1 == "params" || $1 == "bias" { printf "%s %s, ", $1, $3 } $1 ~ /^adam/ { printf "%s %s ", $1, $5 }' "$TMP/run_close.diff")"
    else
        bad "$what: checkpoints differ (tol params $tp abs, moments $tm rel, biases $([ "$tb" = 0 ] && echo exact || echo "$tb abs")):"; cat "$TMP/run_close.diff"
    fi
}
