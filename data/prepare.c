#include "prepare.h"

#include <errno.h>
#include <glob.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include "../base/util.h"
#include "sources.h"

#define SOURCES_MAX 512
#define FORTUNE_DIR "/usr/share/games/fortunes/"
#define BIBLE_COMMAND "bible -f gen1:1-rev22:21 </dev/null"
#define PYTHON_DIR "/usr/lib/python3.11"

typedef struct {
    char *data;   // (n) bytes, capacity cap
    size_t n, cap;
} Bytes;

static void bytes_append(Bytes *b, const void *p, size_t len) {
    if (b->n + len > b->cap) {
        size_t cap = b->cap * 2 > b->n + len ? b->cap * 2 : b->n + len + 4096;
        char *data = realloc(b->data, cap);
        CHECK(data, "out of memory growing a buffer to %zu bytes", cap);
        b->data = data;
        b->cap = cap;
    }
    if (len) memcpy(b->data + b->n, p, len);
    b->n += len;
}

// NUL-terminates the contents without counting the NUL.
static const char *bytes_str(Bytes *b) {
    bytes_append(b, "", 1);
    b->n--;
    return b->data;
}

static void bytes_free(Bytes *b) {
    free(b->data);
    *b = (Bytes){0};
}

typedef struct {
    const char *name;
    Bytes split[2];              // DATA_SPLIT_TRAIN, DATA_SPLIT_VAL
    size_t docs;                 // documents added so far
    char sources[SOURCES_MAX];   // "package=version ..."
} Corpus;

// The split rule (prepare.h): every PREPARE_VAL_EVERY-th document goes to val, so val
// samples the whole domain evenly and a document never straddles the two files.
static void corpus_add(Corpus *c, const char *doc, size_t len) {
    int val = c->docs % PREPARE_VAL_EVERY == PREPARE_VAL_EVERY - 1;
    bytes_append(&c->split[val], doc, len);
    c->docs++;
}

// doc = text with a final newline, so documents never run into each other.
static void doc_set(Bytes *doc, const char *text, size_t len) {
    doc->n = 0;
    bytes_append(doc, text, len);
    if (len && text[len - 1] != '\n') bytes_append(doc, "\n", 1);
}

// ---- commands and packages ---------------------------------------------------------

// Runs a shell command, capturing its stdout. Returns its exit status, -1 if it did not
// run or was killed.
static int run_capture(const char *cmd, Bytes *out) {
    fflush(stdout);
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    char buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, p)) > 0) bytes_append(out, buf, got);
    int status = pclose(p);
    return (status != -1 && WIFEXITED(status)) ? WEXITSTATUS(status) : -1;
}

// 0 and the installed version of pkg, or -1 when it is not installed.
static int package_version(const char *pkg, char *version, size_t n) {
    char cmd[256];
    snprintf(cmd, sizeof cmd, "dpkg-query -W -f='${Status}\\t${Version}' '%s' 2>/dev/null",
             pkg);
    Bytes out = {0};
    int rc = run_capture(cmd, &out);
    const char *s = bytes_str(&out), *want = "install ok installed\t";
    int installed = rc == 0 && !strncmp(s, want, strlen(want));
    if (installed) snprintf(version, n, "%s", s + strlen(want));
    bytes_free(&out);
    return installed ? 0 : -1;
}

static int install_packages(const char *missing, char *err, size_t n) {
    const char *sudo = geteuid() == 0 ? "" : "sudo ";
    if (*sudo && system("command -v sudo >/dev/null 2>&1") != 0)
        return snprintf(err, n,
                        "Debian packages%s are missing and installing them needs root "
                        "(HINT: run 'apt-get install%s' as root)",
                        missing, missing),
               -1;
    printf("data: installing missing Debian packages:%s\n", missing);
    fflush(stdout);
    char install[512], update[64];
    snprintf(install, sizeof install,
             "%senv DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
             "--no-install-recommends%s",
             sudo, missing);
    snprintf(update, sizeof update, "%sapt-get update -qq", sudo);
    // A fresh machine's package lists may be stale or empty: update only when needed.
    if (system(install) != 0 && (system(update) != 0 || system(install) != 0))
        return snprintf(err, n, "apt-get could not install%s (HINT: run 'apt-get install%s' "
                                "as root)",
                        missing, missing),
               -1;
    return 0;
}

// Installs the packages of pkgs that are missing, then lists "pkg=version ..." in sources.
static int ensure_packages(const char *const *pkgs, size_t count, char *sources,
                           char *err, size_t n) {
    char missing[256] = "", version[128];
    for (size_t i = 0; i < count; i++)
        if (package_version(pkgs[i], version, sizeof version) != 0)
            snprintf(missing + strlen(missing), sizeof missing - strlen(missing), " %s",
                     pkgs[i]);
    if (missing[0] && install_packages(missing, err, n) != 0) return -1;
    sources[0] = '\0';
    for (size_t i = 0; i < count; i++) {
        if (package_version(pkgs[i], version, sizeof version) != 0)
            return snprintf(err, n, "Debian package %s is still not installed", pkgs[i]), -1;
        snprintf(sources + strlen(sources), SOURCES_MAX - strlen(sources), "%s%s=%s",
                 i ? " " : "", pkgs[i], version);
    }
    return 0;
}

static int read_whole_file(const char *path, Bytes *out, char *err, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return snprintf(err, n, "%s: %s", path, strerror(errno)), -1;
    char buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) bytes_append(out, buf, got);
    int failed = ferror(f);
    fclose(f);
    if (failed) return snprintf(err, n, "%s: read error", path), -1;
    return 0;
}

static int is_regular_file(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int has_suffix(const char *s, const char *suffix) {
    size_t ls = strlen(s), lx = strlen(suffix);
    return ls >= lx && !strcmp(s + ls - lx, suffix);
}

// ---- fortunes ----------------------------------------------------------------------

// Every fortune ends with its own "%" line, also the last of a file that has none.
static void fortune_flush(Corpus *c, const char *text, size_t len, Bytes *doc) {
    if (len == 0) return;
    doc_set(doc, text, len);
    bytes_append(doc, "%\n", 2);
    corpus_add(c, doc->data, doc->n);
}

// Fortune files hold entries separated by lines holding only "%".
static void fortune_split(Corpus *c, const char *text, size_t len, Bytes *doc) {
    size_t start = 0, line = 0;
    while (line < len) {
        const char *nl = memchr(text + line, '\n', len - line);
        size_t end = nl ? (size_t)(nl - text) : len, next = nl ? end + 1 : len;
        if (end - line == 1 && text[line] == '%') {
            fortune_flush(c, text + start, line - start, doc);
            start = next;
        }
        line = next;
    }
    fortune_flush(c, text + start, len - start, doc);
}

// The packages' own file lists, so fortunes other packages add to the directory (other
// languages, offensive sets) never change the corpus.
static int fortune_files(PathList *files, char *err, size_t n) {
    Bytes out = {0};
    int rc = run_capture("dpkg-query -L fortunes fortunes-min 2>/dev/null", &out);
    const char *s = bytes_str(&out);
    for (const char *line = s; rc == 0 && *line;) {
        size_t len = strcspn(line, "\n");
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%.*s", (int)len, line);
        const char *name = path + strlen(FORTUNE_DIR);
        if (!strncmp(path, FORTUNE_DIR, strlen(FORTUNE_DIR)) && *name && !strchr(name, '/') &&
            !has_suffix(name, ".dat") && !has_suffix(name, ".u8") && is_regular_file(path))
            path_list_add(files, path);
        line += len + (line[len] == '\n');
    }
    bytes_free(&out);
    if (rc != 0 || files->n == 0)
        return snprintf(err, n, "no fortune text files listed by 'dpkg-query -L fortunes "
                                "fortunes-min'"),
               -1;
    path_list_sort(files);
    return 0;
}

static int build_fortunes(Corpus *c, char *err, size_t n) {
    static const char *const pkgs[] = {"fortunes", "fortunes-min"};
    if (ensure_packages(pkgs, 2, c->sources, err, n) != 0) return -1;
    PathList files = {0};
    int rc = fortune_files(&files, err, n);
    Bytes text = {0}, doc = {0};
    for (size_t i = 0; rc == 0 && i < files.n; i++) {
        text.n = 0;
        rc = read_whole_file(files.paths[i], &text, err, n);
        if (rc == 0) fortune_split(c, text.data, text.n, &doc);
    }
    bytes_free(&text);
    bytes_free(&doc);
    path_list_free(&files);
    return rc;
}

// ---- bible -------------------------------------------------------------------------

// Lines are "Ge1:1 In the beginning ...": a chapter is a run of lines whose reference
// agrees up to the ':'.
static int bible_split(Corpus *c, const char *text, size_t len, char *err, size_t n) {
    size_t start = 0, key_len = 0;
    const char *key = NULL;
    for (size_t line = 0; line < len;) {
        const char *nl = memchr(text + line, '\n', len - line);
        size_t next = nl ? (size_t)(nl - text) + 1 : len;
        const char *colon = memchr(text + line, ':', next - line);
        if (!colon)
            return snprintf(err, n, "'%s' printed a line without a verse reference at byte "
                                    "%zu",
                            BIBLE_COMMAND, line),
                   -1;
        size_t klen = (size_t)(colon - (text + line));
        if (key && (klen != key_len || memcmp(key, text + line, klen))) {
            corpus_add(c, text + start, line - start);
            start = line;
        }
        key = text + line;
        key_len = klen;
        line = next;
    }
    if (start < len) corpus_add(c, text + start, len - start);
    return 0;
}

static int build_bible(Corpus *c, char *err, size_t n) {
    static const char *const pkgs[] = {"bible-kjv", "bible-kjv-text"};
    if (ensure_packages(pkgs, 2, c->sources, err, n) != 0) return -1;
    Bytes out = {0};
    int status = run_capture(BIBLE_COMMAND, &out);
    int rc;
    if (status != 0 || out.n == 0 || strncmp(bytes_str(&out), "Ge1:1 ", 6))
        rc = (snprintf(err, n, "'%s' failed (exit status %d) or did not start at Genesis 1:1",
                       BIBLE_COMMAND, status),
              -1);
    else rc = bible_split(c, out.data, out.n, err, n);
    bytes_free(&out);
    return rc;
}

// ---- python ------------------------------------------------------------------------

// PYTHON_DIR, else the /usr/lib/python3.N with the highest N. Returns 0 or -1.
static int python_find_dir(char *dir, size_t n) {
    struct stat st;
    if (stat(PYTHON_DIR, &st) == 0 && S_ISDIR(st.st_mode))
        return snprintf(dir, n, "%s", PYTHON_DIR), 0;
    glob_t g;
    int best = -1;
    if (glob("/usr/lib/python3.*", GLOB_ONLYDIR, NULL, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc; i++) {
            int minor, used = 0;
            if (sscanf(g.gl_pathv[i], "/usr/lib/python3.%d%n", &minor, &used) == 1 &&
                g.gl_pathv[i][used] == '\0' && minor > best) {
                best = minor;
                snprintf(dir, n, "%s", g.gl_pathv[i]);
            }
        }
        globfree(&g);
    }
    return best >= 0 ? 0 : -1;
}

// Single-quotes s for the shell.
static void shell_quote(Bytes *out, const char *s) {
    bytes_append(out, " '", 2);
    for (; *s; s++) {
        if (*s == '\'') bytes_append(out, "'\\''", 4);
        else bytes_append(out, s, 1);
    }
    bytes_append(out, "'", 1);
}

// Adds the packages of one `dpkg-query -S` line, "pkg[:arch][, pkg2[:arch]]: path".
static void add_owners(PathList *owners, const char *line, size_t len) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%.*s", (int)len, line);
    char *sep = strstr(buf, ": /");
    if (!sep || !strncmp(buf, "diversion ", 10)) return;
    *sep = '\0';
    char *save = NULL;
    for (char *pkg = strtok_r(buf, ", ", &save); pkg; pkg = strtok_r(NULL, ", ", &save)) {
        pkg[strcspn(pkg, ":")] = '\0';   // the architecture qualifier
        path_list_add(owners, pkg);
    }
}

// "package=version ..." of the packages owning the files used.
static void python_sources(const PathList *used, char *sources) {
    Bytes cmd = {0}, out = {0};
    bytes_append(&cmd, "dpkg-query -S", 13);
    for (size_t i = 0; i < used->n; i++) shell_quote(&cmd, used->paths[i]);
    bytes_append(&cmd, " 2>/dev/null", 12);
    run_capture(bytes_str(&cmd), &out);   // a nonzero status only means some file is unowned
    PathList owners = {0};
    const char *text = bytes_str(&out);
    for (size_t pos = 0, len; text[pos]; pos += len + (text[pos + len] == '\n')) {
        len = strcspn(text + pos, "\n");
        add_owners(&owners, text + pos, len);
    }
    path_list_sort(&owners);
    sources[0] = '\0';
    char version[128];
    for (size_t i = 0; i < owners.n; i++) {
        if ((i && !strcmp(owners.paths[i], owners.paths[i - 1])) ||
            package_version(owners.paths[i], version, sizeof version) != 0)
            continue;
        snprintf(sources + strlen(sources), SOURCES_MAX - strlen(sources), "%s%s=%s",
                 sources[0] ? " " : "", owners.paths[i], version);
    }
    if (!sources[0]) snprintf(sources, SOURCES_MAX, "(files owned by no Debian package)");
    path_list_free(&owners);
    bytes_free(&cmd);
    bytes_free(&out);
}

// Whole files in name order while the total stays within the budget.
static int python_add_files(Corpus *c, const char *dir, PathList *used, char *err, size_t n) {
    char pattern[PATH_MAX + 8];
    snprintf(pattern, sizeof pattern, "%s/*.py", dir);
    glob_t g;
    if (glob(pattern, 0, NULL, &g) != 0)
        return snprintf(err, n, "%s: no Python source files", pattern), -1;
    PathList files = {0};
    for (size_t i = 0; i < g.gl_pathc; i++)
        if (is_regular_file(g.gl_pathv[i])) path_list_add(&files, g.gl_pathv[i]);
    globfree(&g);
    path_list_sort(&files);
    Bytes text = {0}, doc = {0};
    size_t total = 0;
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < files.n; i++) {
        text.n = 0;
        rc = read_whole_file(files.paths[i], &text, err, n);
        if (rc != 0) break;
        doc_set(&doc, text.data, text.n);
        if (total + doc.n > PREPARE_PYTHON_BUDGET) break;
        corpus_add(c, doc.data, doc.n);
        total += doc.n;
        path_list_add(used, files.paths[i]);
    }
    bytes_free(&text);
    bytes_free(&doc);
    path_list_free(&files);
    return rc;
}

static int build_python(Corpus *c, char *err, size_t n) {
    static const char *const pkgs[] = {"libpython3-stdlib"};
    char dir[PATH_MAX], installed[SOURCES_MAX];
    if (python_find_dir(dir, sizeof dir) != 0) {
        if (ensure_packages(pkgs, 1, installed, err, n) != 0) return -1;
        if (python_find_dir(dir, sizeof dir) != 0)
            return snprintf(err, n, "no /usr/lib/python3.* directory, even after installing %s",
                            pkgs[0]),
                   -1;
    }
    PathList used = {0};
    int rc = python_add_files(c, dir, &used, err, n);
    if (rc == 0) python_sources(&used, c->sources);
    path_list_free(&used);
    return rc;
}

// ---- writing and checking ----------------------------------------------------------

static int make_dirs(const char *path, char *err, size_t n) {
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s", path);
    for (char *s = p + 1;; s++) {
        if (*s != '/' && *s != '\0') continue;
        char c = *s;
        *s = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST)
            return snprintf(err, n, "%s: cannot create directory: %s", p, strerror(errno)), -1;
        if (!c) return 0;
        *s = c;
    }
}

// Writes under a temporary name, syncs, then renames over path.
static int write_atomic(const char *path, const void *data, size_t len, char *err, size_t n) {
    char tmp[PATH_MAX + 32];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) return snprintf(err, n, "%s: %s", tmp, strerror(errno)), -1;
    int ok = fwrite(data, 1, len, f) == len && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        snprintf(err, n, "%s: cannot write: %s", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

static const char *const split_names[] = {"train", "val"};

static int write_domain(const char *out_dir, const Corpus *c, Bytes *manifest, char *err,
                        size_t n) {
    char dir[PATH_MAX], path[PATH_MAX + 16], row[SOURCES_MAX + 256];
    snprintf(dir, sizeof dir, "%s/%s", out_dir, c->name);
    if (make_dirs(dir, err, n) != 0) return -1;
    for (int s = 0; s < 2; s++) {
        const Bytes *b = &c->split[s];
        snprintf(path, sizeof path, "%s/%s.txt", dir, split_names[s]);
        if (write_atomic(path, b->data, b->n, err, n) != 0) return -1;
        unsigned long crc = crc32_z(0, (const unsigned char *)b->data, b->n);
        snprintf(row, sizeof row, "%s\t%s\t%s/%s.txt\t%zu\t%08lx\t%s\n", c->name,
                 split_names[s], c->name, split_names[s], b->n, crc, c->sources);
        bytes_append(manifest, row, strlen(row));
    }
    printf("data: %-8s %6zu documents  train %9zu bytes  val %8zu bytes  (%s)\n", c->name,
           c->docs, c->split[0].n, c->split[1].n, c->sources);
    fflush(stdout);
    return 0;
}

typedef int (*BuildFn)(Corpus *c, char *err, size_t n);

static const struct {
    const char *name;
    BuildFn build;
} builders[] = {{"fortunes", build_fortunes}, {"bible", build_bible}, {"python", build_python}};

#define N_BUILDERS (sizeof builders / sizeof *builders)

int data_prepare_default(const char *out_dir, char *err, size_t n) {
    if (data_default_ready(out_dir)) {
        printf("data: %s is up to date (%s checksums match)\n", out_dir, PREPARE_MANIFEST_NAME);
        return 0;
    }
    if (make_dirs(out_dir, err, n) != 0) return -1;
    Bytes manifest = {0};
    const char *head = PREPARE_MANIFEST_FORMAT "\n" PREPARE_MANIFEST_HEADER "\n";
    bytes_append(&manifest, head, strlen(head));
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < N_BUILDERS; i++) {
        Corpus c = {.name = builders[i].name};
        rc = builders[i].build(&c, err, n);
        if (rc == 0) rc = write_domain(out_dir, &c, &manifest, err, n);
        bytes_free(&c.split[0]);
        bytes_free(&c.split[1]);
    }
    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/%s", out_dir, PREPARE_MANIFEST_NAME);
    if (rc == 0) rc = write_atomic(path, manifest.data, manifest.n, err, n);
    bytes_free(&manifest);
    return rc;
}

// 1 when the file at dir/file has exactly `bytes` bytes with zlib crc32 `crc`.
static int file_matches(const char *dir, const char *file, size_t bytes, unsigned long crc) {
    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    unsigned char buf[1 << 16];
    unsigned long c = crc32_z(0, NULL, 0);
    size_t got, total = 0;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) {
        c = crc32_z(c, buf, got);
        total += got;
    }
    int ok = !ferror(f) && total == bytes && c == crc;
    fclose(f);
    return ok;
}

static int read_line(FILE *f, char *line, size_t n) {
    if (!fgets(line, (int)n, f)) return -1;
    line[strcspn(line, "\n")] = '\0';
    return 0;
}

int data_default_ready(const char *dir) {
    char path[PATH_MAX + 16], line[SOURCES_MAX + 1024];
    snprintf(path, sizeof path, "%s/%s", dir, PREPARE_MANIFEST_NAME);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    int ok = read_line(f, line, sizeof line) == 0 && !strcmp(line, PREPARE_MANIFEST_FORMAT) &&
             read_line(f, line, sizeof line) == 0 && !strcmp(line, PREPARE_MANIFEST_HEADER);
    size_t verified = 0;
    while (ok && read_line(f, line, sizeof line) == 0) {
        char file[PATH_MAX];
        size_t bytes;
        unsigned long crc;
        ok = sscanf(line, "%*[^\t]\t%*[^\t]\t%4095[^\t]\t%zu\t%lx", file, &bytes, &crc) == 3 &&
             file_matches(dir, file, bytes, crc);
        verified += ok;
    }
    fclose(f);
    return ok && verified == 2 * N_BUILDERS;
}
