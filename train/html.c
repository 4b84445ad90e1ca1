#include "html.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "config.h"

static const char *base_css =
    "body{font-family:sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;"
    "color:#222;background:#fff}\n"
    "h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}\n"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
    "padding:.2em .6em;text-align:right}th{background:#f3f3f3}td:first-child,"
    "th:first-child{text-align:left}\n"
    "pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap;font-size:.9em}\n"
    "figure{margin:1em 0}figcaption{font-size:.9em;color:#555}\n"
    ".note{color:#8a4b00}\n"
    // gnuplot draws heatmaps as small images: show their cells, not a blur.
    "svg image{image-rendering:pixelated}\n";

void html_begin(FILE *f, const char *title, const char *css) {
    fputs("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>", f);
    html_text(f, title);
    fprintf(f, "</title>\n<style>\n%s%s</style>\n</head>\n<body>\n<h1>", base_css, css);
    html_text(f, title);
    fputs("</h1>\n", f);
}

void html_end(FILE *f) { fputs("</body>\n</html>\n", f); }

size_t html_utf8_len(const unsigned char *s, size_t avail) {
    size_t len = s[0] < 0x80             ? 1
                 : (s[0] & 0xe0) == 0xc0 ? 2
                 : (s[0] & 0xf0) == 0xe0 ? 3
                 : (s[0] & 0xf8) == 0xf0 ? 4
                                         : 0;
    if (len == 0 || len > avail) return 0;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xc0) != 0x80) return 0;
    // Overlong forms, surrogates and code points past U+10FFFF are not valid UTF-8.
    unsigned cp = len == 1 ? s[0] : s[0] & (0x7f >> len);
    for (size_t i = 1; i < len; i++)
        cp = cp << 6 | (s[i] & 0x3f);
    static const unsigned min[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min[len] || (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff) return 0;
    return len;
}

void html_text(FILE *f, const char *text) {
    const unsigned char *s = (const unsigned char *)text;
    size_t left = strlen(text);
    while (left > 0) {
        size_t len = html_utf8_len(s, left);
        if (len == 0)
            fprintf(f, "\\x%02x", s[0]), len = 1;
        else if (*s == '&')
            fputs("&amp;", f);
        else if (*s == '<')
            fputs("&lt;", f);
        else if (*s == '>')
            fputs("&gt;", f);
        else if (*s == '"')
            fputs("&quot;", f);
        else if (*s == '\'')
            fputs("&#39;", f);
        else if (*s < 0x20 && *s != '\n' && *s != '\t')
            fprintf(f, "\\x%02x", *s);
        else
            fwrite(s, 1, len, f);
        s += len;
        left -= len;
    }
}

static char *read_file(const char *path, char *err, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return snprintf(err, n, "%s: cannot read: %s", path, strerror(errno)), NULL;
    size_t cap = 1 << 16, len = 0, got;
    char *buf = malloc(cap);
    while (buf && (got = fread(buf + len, 1, cap - len - 1, f)) > 0)
        if ((len += got) + 1 == cap) buf = realloc(buf, cap *= 2);
    fclose(f);
    if (!buf) DIE("out of memory reading %s", path);
    buf[len] = '\0';
    return buf;
}

// gnuplot names its ids alike in every figure (gnuplot_canvas, gpPt0, ...): id='x'
// becomes id='NAME-x', and the references href='#x' follow.
int html_inline_svg(FILE *f, const char *dir, const char *name, char *err, size_t n) {
    char path[RUN_FILE_MAX];
    snprintf(path, sizeof path, "%s/%s.svg", dir, name);
    char *svg = read_file(path, err, n);
    if (!svg) return -1;
    const char *p = strstr(svg, "<svg");
    if (!p) {
        snprintf(err, n, "%s: not an SVG file (no <svg> element)", path);
        free(svg);
        return -1;
    }
    static const char *marks[] = {"id='", "id=\"", "href='#", "href=\"#"};
    while (*p) {
        size_t i, m = 0;
        for (i = 0; i < 4; i++)
            if (!strncmp(p, marks[i], (m = strlen(marks[i])))) break;
        if (i == 4) {
            fputc(*p++, f);
            continue;
        }
        fwrite(p, 1, m, f);
        fprintf(f, "%s-", name);
        p += m;
    }
    fputc('\n', f);
    free(svg);
    return 0;
}

void html_figure(FILE *f, const char *dir, const char *name, const char *caption,
                 const char *plot_why) {
    char err[RUN_FILE_MAX + 128];
    fputs("<figure>\n", f);
    if (plot_why[0]) {
        fputs("<p class=\"note\">Figure not drawn: ", f);
        html_text(f, plot_why);
        fputs("</p>\n", f);
    } else if (html_inline_svg(f, dir, name, err, sizeof err) != 0) {
        fputs("<p class=\"note\">Figure missing: ", f);
        html_text(f, err);
        fputs("</p>\n", f);
    }
    fputs("<figcaption>", f);
    html_text(f, caption);
    fprintf(f, " (<a href=\"%s.png\">%s.png</a>)</figcaption>\n</figure>\n", name, name);
}
