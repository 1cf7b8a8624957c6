// Load-balancing policy of the MoE router: which balancing method runs, how the
// per-expert routing bias is updated from token counts (the rule and the step-size
// schedule of auxiliary-loss-free balancing, Wang et al. arXiv 2408.15664), its
// command-line options, and the balance metrics (MaxVio, idle experts, ...).
//
// Plain host C shared unchanged by every trainer. It never sees activations: its
// input is the exact integer number of tokens routed to each expert of each MoE
// layer, counted over one whole global batch (all micro-batches, all ranks); its
// output is the updated fp32 bias, one vector of E per MoE layer. The model's
// forward does the routing with that bias and computes the auxiliary losses; it
// asks this module only how to route (balance_route_options) and where the
// biases start (balance_bias_init).
//
// Array shapes: counts and bias are (n_layers, E) row-major, one row per MoE layer
// (layer 0 is the first MoE layer, not the first transformer layer).
// See docs/balance.md for the formulas and the options.
#ifndef MOE_BALANCE_H
#define MOE_BALANCE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "route.h"

// ----------------------------------------------------------------------------
// Configuration and options

typedef struct {
    int method;             // index into the method table (--balance)
    int rule;               // index into the update-rule table (--gamma-rule)
    int schedule;           // index into the schedule table (--gamma-schedule)
    int center;             // 1: subtract the mean update across experts (--gamma-center)
    double aux_alpha;       // auxiliary-loss weight; < 0 means "the method's default"
    double gamma;           // base bias update rate (--gamma)
    double gamma_min;       // cosine schedule's final value (--gamma-min)
    double gamma_tau;       // inv / invsqrt time constant in steps (--gamma-tau)
    double gamma_stop_frac; // stop schedule: fraction of training with gamma > 0
    int bias_logits;        // --bias-on: 0 the bias is added to the affinities s, 1 to the
                            // router logits (selection on u + b; Han & Zhong's code)
    int update_micro;       // --bias-update-every: 0 once per step from the whole batch's
                            // counts, 1 after every micro-batch from its counts
} BalanceConfig;

// The defaults: --balance alf --gamma-rule sign --gamma 0.001 --gamma-schedule const.
void balance_config_default(BalanceConfig *c);

// Sets one option from its text, e.g. ("--gamma-rule", "prop"); the key may be
// given with or without the leading "--". Returns 0, -1 for a key this module
// does not own (err untouched, so a trainer can offer it to other modules), or -2
// for a bad value (err gets a message naming the option and the accepted values).
int balance_set_option(BalanceConfig *c, const char *key, const char *value,
                       char *err, size_t errlen);
// True when key (with or without "--") is one of this module's options.
int balance_has_option(const char *key);
// Checks the options together. Returns 0, or -1 with a message in err.
int balance_validate(const BalanceConfig *c, char *err, size_t errlen);
// Every option with its default, every method, rule and schedule by name.
void balance_print_help(FILE *f);
// The configuration as "option=value" lines (aux-alpha resolved to the value used).
void balance_print_config(const BalanceConfig *c, FILE *f);
// The configuration as a JSON fragment without braces, for a JSON-lines log:
// "balance":"alf","gamma_rule":"sign",...  Returns what fprintf returns in total.
int balance_config_json(const BalanceConfig *c, FILE *f);

const char *balance_method_name(const BalanceConfig *c);
const char *balance_rule_name(const BalanceConfig *c);
const char *balance_schedule_name(const BalanceConfig *c);

// ----------------------------------------------------------------------------
// What the model's forward needs

// 1 when routing selects by a bias (the alf methods), 0 otherwise.
int balance_uses_bias(const BalanceConfig *c);
// 1 when selection is TopK of s * b (rule mult), 0 for TopK of s + b.
int balance_bias_is_multiplicative(const BalanceConfig *c);
// The value every bias starts at: 1 for the multiplicative rule, else 0.
float balance_bias_init_value(const BalanceConfig *c);
// 1 when the bias is added to the router logits (--bias-on logits), 0 when to
// the affinities.
int balance_bias_on_logits(const BalanceConfig *c);
// 1 when the bias is updated after every micro-batch (--bias-update-every
// micro), 0 once per optimizer step.
int balance_updates_per_micro_batch(const BalanceConfig *c);
// AUX_NONE, AUX_EXPERT (DeepSeekMoE, arXiv 2401.06066) or AUX_SEQ
// (DeepSeek-V3, arXiv 2412.19437); see model/route.h.
int balance_aux_kind(const BalanceConfig *c);
// The auxiliary-loss weight: --aux-alpha, or the method's default; 0 without aux loss.
double balance_aux_alpha(const BalanceConfig *c);
// The routing behaviour this policy asks of the model: additive or
// multiplicative bias, the auxiliary loss and its weight.
RouteOptions balance_route_options(const BalanceConfig *c);
// Fills bias (n_layers, E) with balance_bias_init_value.
void balance_bias_init(const BalanceConfig *c, float *bias, int n_layers, int E);

// ----------------------------------------------------------------------------
// The bias update

// The update rate for optimizer step `step` (0-based: the step whose counts are
// being applied) of a run of total_steps steps. Computed in double, returned as
// float. cosine and stop need total_steps >= 1; with total_steps <= 0 they return
// gamma (the end of training is unknown).
float balance_gamma_at(const BalanceConfig *c, int64_t step, int64_t total_steps);

// One layer: mean = top_k * n_tokens / E, the rule's update per expert from
// (mean - counts[i]), centred when --gamma-center 1, applied in double and stored
// to fp32. Runs whatever the method (the caller decides whether to call it).
// Does nothing when top_k * n_tokens == 0.
void balance_update_layer(const BalanceConfig *c, float gamma_t,
                          const int64_t *counts /* (E) */, int E, int top_k,
                          int64_t n_tokens, float *bias /* (E), fp32 */);

// Every layer, for optimizer step `step`: the gamma of the schedule, then
// balance_update_layer per layer. Does nothing for methods without a bias.
// Checks first that every layer's counts are >= 0 and sum to top_k * n_tokens
// (each token picks exactly top_k experts); if not, changes nothing and returns
// -1, since wrong counts mean a counting bug upstream (double-counted
// recomputation, counts not summed over all ranks or micro-batches). Else 0.
int balance_update(const BalanceConfig *c, int64_t step, int64_t total_steps,
                   const int64_t *counts /* (n_layers, E) */, int n_layers, int E,
                   int top_k, int64_t n_tokens, float *bias /* (n_layers, E) */);

// 0 when counts (E) are all >= 0 and sum to top_k * n_tokens, else -1.
int balance_check_counts(const int64_t *counts /* (E) */, int E, int top_k, int64_t n_tokens);

// ----------------------------------------------------------------------------
// Metrics

// MaxVio = (max_i c_i - mean) / mean, mean = top_k * n_tokens / E
// (Wang et al. arXiv 2408.15664, Eq. 4). 0 when top_k * n_tokens == 0.
double balance_maxvio(const int64_t *counts /* (E) */, int E, int top_k, int64_t n_tokens);

#define BALANCE_MAX_LAYERS 256 // most MoE layers the metrics struct holds

// The balance of one batch. Loads are given relative to the mean load, so that
// they are finite even when an expert is idle: max/mean = 1 + MaxVio, and
// min/mean = load_min (the max/min ratio is (1 + MaxVio) / load_min, infinite
// when an expert is idle, which is why it is not stored).
typedef struct {
    int n_layers;
    double maxvio_batch;                     // MaxVio averaged over the layers
    int maxvio_worst_layer;                  // layer with the largest MaxVio
    double maxvio[BALANCE_MAX_LAYERS];       // (n_layers) MaxVio per layer
    double load_min[BALANCE_MAX_LAYERS];     // (n_layers) min_i c_i / mean
    int idle[BALANCE_MAX_LAYERS];            // (n_layers) experts with c_i == 0
    int idle_total;                          // idle experts over all layers
    int has_bias;                            // 0: the bias fields are unset
    double bias_mean, bias_min, bias_max;    // over all layers and experts
} BalanceMetrics;

// Fills m from counts (n_layers, E) and, when bias is not NULL, the bias
// (n_layers, E) (pass the bias that routed this batch, i.e. before the update,
// so that counts and bias belong together). Returns 0, or -1 when n_layers is
// outside 1..BALANCE_MAX_LAYERS.
int balance_metrics(const int64_t *counts, int n_layers, int E, int top_k,
                    int64_t n_tokens, const float *bias, BalanceMetrics *m);
// One human line: "maxvio 0.231 (worst 0.412 @moe3) idle 0 minload 0.71 bias ..."
void balance_metrics_print(const BalanceMetrics *m, FILE *f);
// The metrics as a JSON fragment without braces, e.g.
// "maxvio_batch":0.123,"maxvio_layers":[...],"idle":3,"idle_layers":[...],...
// _json writes into buf (always NUL-terminated when len > 0) and returns the
// length of the whole fragment, as snprintf does (>= len means truncated);
// _json_file writes to f and returns the characters written, or -1.
int balance_metrics_json(const BalanceMetrics *m, char *buf, size_t len);
int balance_metrics_json_file(const BalanceMetrics *m, FILE *f);

// MaxVio_global over an evaluation set: counts summed over every batch, then
// MaxVio per layer, then averaged over layers.
typedef struct {
    int n_layers, E, top_k;
    int64_t n_tokens; // tokens added so far
    int64_t *counts;  // (n_layers, E) summed counts
} BalanceAccum;

// Returns 0, or -1 when out of memory or the sizes are not positive.
int balance_accum_init(BalanceAccum *a, int n_layers, int E, int top_k);
void balance_accum_reset(BalanceAccum *a);
void balance_accum_add(BalanceAccum *a, const int64_t *counts /* (n_layers, E) */,
                       int64_t n_tokens);
// The average over layers; per_layer (n_layers) gets each layer's when not NULL.
double balance_accum_maxvio(const BalanceAccum *a, double *per_layer);
// "maxvio_global":0.04,"maxvio_global_layers":[...]  (same return as _json).
int balance_accum_json(const BalanceAccum *a, char *buf, size_t len);
void balance_accum_free(BalanceAccum *a);

#endif
