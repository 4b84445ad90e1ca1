// html.h: what the HTML pages (report.h: report.html, route_page.h: route.html) share:
// the page frame and its style sheet, escaped text, and gnuplot's SVG figures inlined.
//
// A page is one self-contained file: no script, no network, figures as inline <svg>.
#ifndef MOE_HTML_H
#define MOE_HTML_H

#include <stddef.h>
#include <stdio.h>

// <!DOCTYPE html> to <body><h1>title</h1>; css is added to the common style sheet.
void html_begin(FILE *f, const char *title, const char *css);
void html_end(FILE *f);
// text escaped for HTML content and attribute values; bytes that are not valid UTF-8
// are written as \xNN.
void html_text(FILE *f, const char *text);
// Length of the valid UTF-8 sequence starting at s (1..4), or 0 when s does not start one.
size_t html_utf8_len(const unsigned char *s, size_t avail);
// The SVG file dir/name.svg inlined (from its <svg> element on), its ids prefixed by
// name so that several figures share one page. Returns 0, or -1 with err.
int html_inline_svg(FILE *f, const char *dir, const char *name, char *err, size_t n);
// A figure: the inline SVG and its caption, or the reason it is missing.
void html_figure(FILE *f, const char *dir, const char *name, const char *caption,
                 const char *plot_why);

#endif
