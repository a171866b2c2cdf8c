/* The pause container of the test cluster (scripts/cluster.sh): the process that holds a
 * pod's namespaces. It sleeps until SIGINT or SIGTERM and reaps the zombies it inherits,
 * like Kubernetes' own pause (build/pause/linux/pause.c). Built static (gcc -static) into
 * a FROM-scratch image by mk/cluster.mk, so no registry is needed. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void sigdown(int signo) {
  (void)signo;
  _exit(0);
}

static void sigreap(int signo) {
  (void)signo;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    printf("parley pause 1.0\n");
    return 0;
  }
  if (getpid() != 1) {
    fprintf(stderr, "pause: warning: not pid 1\n");
  }
  struct sigaction down = {.sa_handler = sigdown};
  struct sigaction reap = {.sa_handler = sigreap, .sa_flags = SA_NOCLDSTOP};
  if (sigaction(SIGINT, &down, NULL) < 0 || sigaction(SIGTERM, &down, NULL) < 0 ||
      sigaction(SIGCHLD, &reap, NULL) < 0) {
    perror("pause: sigaction");
    return 1;
  }
  for (;;) {
    pause();
  }
}
