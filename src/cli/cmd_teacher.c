/* src/cli/cmd_teacher.c - placeholder until its layer lands; the owner replaces this file. */
#include "cli/cli.h"
int kd_cmd_teacher(int argc, char **argv) { (void)argc; kd_cli_error(argv[0], "not available in this build yet"); return 2; }
int kd_cmd_cache(int argc, char **argv) { (void)argc; kd_cli_error(argv[0], "not available in this build yet"); return 2; }
