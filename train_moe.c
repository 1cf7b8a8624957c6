// train_moe: the CPU trainer (fp32, OpenMP). This file is the readable
// definition of a training run; the model itself lives in model/.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/config.h"
#include "model/layout.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: train_moe [options]\n"
            "  --config NAME|FILE   model preset (tiny, small, 1b, 3b) or key=value file (default tiny)\n"
            "  --print-config       print every model field, parameter counts and FLOPs, then exit\n"
            "  --help               this text\n"
            "Every model field can also be set as an option with dashes, e.g. --n-routed 32.\n");
}

// "n-routed" -> "n_routed"
static void option_to_field(const char *opt, char *field, size_t n) {
    snprintf(field, n, "%s", opt);
    for (char *p = field; *p; p++)
        if (*p == '-') *p = '_';
}

int main(int argc, char **argv) {
    MoeConfig cfg;
    config_preset(&cfg, "tiny");
    int print_config = 0;
    char err[512];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--print-config") == 0) {
            print_config = 1;
        } else if (strcmp(a, "--config") == 0 && i + 1 < argc) {
            const char *v = argv[++i];
            if (config_preset(&cfg, v) != 0 && config_load_file(&cfg, v, err, sizeof err) != 0) {
                fprintf(stderr, "error: --config %s: not a preset (tiny, small, 1b, 3b) and %s\n", v, err);
                return 1;
            }
        } else if (strncmp(a, "--", 2) == 0 && i + 1 < argc) {
            char field[128];
            option_to_field(a + 2, field, sizeof field);
            int r = config_set(&cfg, field, argv[i + 1]);
            if (r == -1) {
                fprintf(stderr, "error: unknown option %s (see --help)\n", a);
                return 1;
            }
            if (r == -2) {
                fprintf(stderr, "error: bad value '%s' for %s\n", argv[i + 1], a);
                return 1;
            }
            i++;
        } else {
            fprintf(stderr, "error: unknown option %s (see --help)\n", a);
            return 1;
        }
    }
    if (config_validate(&cfg, err, sizeof err) != 0) {
        fprintf(stderr, "error: invalid model config: %s\n", err);
        return 1;
    }
    if (print_config) {
        config_write(&cfg, stdout);
        printf("total parameters: %lld\n", (long long)config_total_params(&cfg));
        printf("active parameters per token: %lld\n", (long long)config_active_params(&cfg));
        printf("training FLOPs per token (T=%d): %.4g\n", cfg.seq_len,
               config_train_flops_per_token(&cfg, cfg.seq_len));
        return 0;
    }
    fprintf(stderr, "training is not implemented yet\n");
    return 1;
}
