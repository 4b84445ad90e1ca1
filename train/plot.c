#include "plot.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../base/util.h"

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

void plot_begin_figure(FILE *f, const char *name, int width, int height) {
    fprintf(f,
            "if (!exists('term')) term = 'png'\n"
            "if (term eq 'svg') {\n"
            "  set terminal svg size %d,%d noenhanced font 'sans,11' background '#ffffff'\n"
            "  set output '%s.svg'\n"
            "} else {\n"
            "  set terminal pngcairo size %d,%d noenhanced font ',10'\n"
            "  set output '%s.png'\n"
            "}\n",
            width, height, name, width, height, name);
}

const char *plot_heatmap(int nx, int ny) {
    if (nx >= 2 && ny >= 2) return "using 1:2:3 with image";
    return "using 1:2:(0.5):(0.5):3 with boxxyerror fillstyle solid noborder lc palette";
}

void plot_quote(FILE *f, const char *text) {
    fputc('\'', f);
    for (const char *p = text; *p; p++) {
        if (*p == '\'') fputc('\'', f);
        fputc(*p, f);
    }
    fputc('\'', f);
}

// The last non-empty line of text, trimmed, into why.
static void last_line(const char *text, char *why, size_t n) {
    const char *end = text + strlen(text);
    while (end > text && (end[-1] == '\n' || end[-1] == ' ')) end--;
    const char *start = end;
    while (start > text && start[-1] != '\n') start--;
    snprintf(why, n, "%.*s", (int)(end - start), start);
}

// `gnuplot [-e term='svg'] script` in dir; its stdout and stderr go into out.
static int run_gnuplot(const char *dir, const char *script, int svg, char *out, size_t n) {
    int fd[2];
    if (pipe(fd) != 0) return snprintf(out, n, "cannot start gnuplot (pipe)"), -1;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        dup2(fd[1], STDOUT_FILENO);
        dup2(fd[1], STDERR_FILENO);
        if (chdir(dir) != 0) _exit(126);
        if (svg) execlp("gnuplot", "gnuplot", "-e", "term='svg'", script, (char *)NULL);
        else execlp("gnuplot", "gnuplot", script, (char *)NULL);
        _exit(127);
    }
    close(fd[1]);
    size_t len = 0;
    ssize_t got;
    out[0] = '\0';
    char chunk[512];
    while ((got = read(fd[0], chunk, sizeof chunk)) > 0) {
        // Keep the tail: the last error line is what tells the user.
        if (len + (size_t)got >= n) {
            memmove(out, out + len / 2, len - len / 2);
            len -= len / 2;
        }
        memcpy(out + len, chunk, (size_t)got);
        len += (size_t)got;
        out[len] = '\0';
    }
    close(fd[0]);
    int status = -1;
    if (pid > 0) waitpid(pid, &status, 0);
    if (pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0) return 0;
    if (!out[0]) snprintf(out, n, "exit status %d", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    return -1;
}

int plot_render_figures(const char *dir, const char *script, char *why, size_t n) {
    if (!plot_available()) {
        snprintf(why, n, "gnuplot not found on PATH (HINT: apt-get install gnuplot-nox)");
        return -1;
    }
    char *log = CALLOC(16384, 1);
    int rc = 0;
    for (int svg = 0; svg <= 1 && rc == 0; svg++) {
        rc = run_gnuplot(dir, script, svg, log, 16384);
        if (rc != 0) {
            char line[512];
            last_line(log, line, sizeof line);
            snprintf(why, n, "gnuplot failed on %s/%s: %s", dir, script, line);
        }
    }
    free(log);
    return rc;
}
