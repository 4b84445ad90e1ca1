#include "plot.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int plot_available(void) {
    const char *path = getenv("PATH");
    if (!path) return 0;
    char dir[4096];
    for (const char *p = path; *p;) {
        size_t n = strcspn(p, ":");
        // An empty PATH entry means the current directory.
        snprintf(dir, sizeof dir, "%.*s/gnuplot", n ? (int)n : 1, n ? p : ".");
        if (access(dir, X_OK) == 0) return 1;
        p += n + (p[n] == ':');
    }
    return 0;
}

int plot_render(const char *dir, const char *script) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        if (chdir(dir) != 0) _exit(126);
        execlp("gnuplot", "gnuplot", script, (char *)NULL);
        _exit(127);
    }
    int status = -1;
    if (pid > 0) waitpid(pid, &status, 0);
    if (pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0) return 0;
    fprintf(stderr, "moe: warning: gnuplot failed on %s/%s; the CSV files are written\n", dir,
            script);
    return -1;
}

void plot_warn_missing(const char *what) {
    printf("gnuplot not found: %s not drawn (HINT: apt-get install gnuplot-nox, or make "
           "deps-test; then run the .gp script in the output directory)\n",
           what);
}
