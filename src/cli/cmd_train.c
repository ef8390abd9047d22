/* src/cli/cmd_train.c - placeholder until its layer lands; the owner replaces this file. */
#include "cli/cli.h"
int kd_cmd_train(int argc, char **argv) { (void)argc; kd_cli_error(argv[0], "not available in this build yet"); return 2; }
