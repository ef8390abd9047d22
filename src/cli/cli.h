/*
 * src/cli/cli.h - the kdkit command's subcommands.  Each kd_cmd_* gets argv
 * with argv[0] = the subcommand name and returns the process exit code:
 * 0 success, 1 the checked thing is unhealthy / the job failed, 2 usage or
 * input error.  Each prints its usage text for -h/--help.
 */
#ifndef KD_SRC_CLI_CLI_H
#define KD_SRC_CLI_CLI_H

int kd_cmd_status(int argc, char **argv);      /* cmd_status.c */
int kd_cmd_summary(int argc, char **argv);     /* cmd_status.c */
int kd_cmd_checkpoints(int argc, char **argv); /* cmd_status.c */
int kd_cmd_verify(int argc, char **argv);      /* cmd_verify.c */
int kd_cmd_ckpt(int argc, char **argv);        /* cmd_ckpt.c */
int kd_cmd_train(int argc, char **argv);       /* cmd_train.c */
int kd_cmd_serve(int argc, char **argv);       /* cmd_serve.c */
int kd_cmd_teacher(int argc, char **argv);     /* cmd_teacher.c */
int kd_cmd_cache(int argc, char **argv);       /* cmd_teacher.c */
int kd_cmd_eval(int argc, char **argv);        /* cmd_eval.c */
int kd_cmd_mix(int argc, char **argv);         /* cmd_mix.c */
int kd_cmd_report(int argc, char **argv);      /* cmd_report.c */

/* "kdkit CMD: " + message on stderr. */
void kd_cli_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* 1 if argv[i] is -h or --help. */
int kd_cli_is_help(const char *arg);

#endif
