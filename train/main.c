// main.c: the `moe` command line.
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "dump.h"

static void print_usage(FILE *f) {
    fprintf(f,
            "moe: train and fine-tune sparse Mixture-of-Experts language models\n"
            "\n"
            "usage: moe <command> [args]\n"
            "commands:\n"
            "  dump OUT.h5 [section.key=value ...]   forward/backward on test weights, all\n"
            "                                        tensors to HDF5 (reference tests)\n"
            "  help                                  this text and every config key\n"
            "\n"
            "config keys (INI sections [model] [router] [train]; override on the command\n"
            "line as section.key=value):\n");
    run_config_print_help(f);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        print_usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        print_usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "dump")) return dump_main(argc - 1, argv + 1);
    fprintf(stderr, "moe: error: unknown command '%s'\nHINT: moe help lists the commands\n", cmd);
    return 2;
}
