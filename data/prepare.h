// prepare.h: builds the default corpus (docs/file-formats.md, "Default corpus") from
// Debian packages.
//
// Three domains, each written as <out>/<domain>/train.txt and val.txt:
//   fortunes  the text files of the `fortunes` and `fortunes-min` packages
//             (/usr/share/games/fortunes/, not the .dat/.u8 indexes), sorted by name;
//             a document is one fortune, written as its text then a "%" line
//   bible     `bible -f gen1:1-rev22:21` (package `bible-kjv`): the King James text, one
//             verse per line after its reference; a document is one chapter
//   python    the top-level *.py files of /usr/lib/python3.11 (else the highest
//             /usr/lib/python3.* present), sorted by name, whole files while the total
//             stays within PREPARE_PYTHON_BUDGET bytes; a document is one file
// Split rule: documents are numbered from 0 in that order within each domain, and
// document i goes to val when i % 20 == 19 (every 20th, 5%), to train otherwise.
//
// <out>/MANIFEST.tsv: a format line ("# moe.c default corpus ..."), a header row, then
// one row per file: domain, split, file (relative to <out>), bytes, crc32 (zlib, 8 hex
// digits), sources (space-separated package=version from dpkg-query).
//
// Missing packages are installed with apt-get (as root or through sudo). Every file is
// written under a temporary name and renamed, MANIFEST.tsv last, so an interrupted run
// never leaves a half file under a final name. The same package versions give the same
// bytes.
#ifndef MOE_DATA_PREPARE_H
#define MOE_DATA_PREPARE_H

#include <stddef.h>

#define PREPARE_VAL_EVERY 20
#define PREPARE_PYTHON_BUDGET (4u << 20)
#define PREPARE_MANIFEST_NAME "MANIFEST.tsv"
// Bump the format number whenever the builder's output changes: data_default_ready then
// refuses the old corpus and it is rebuilt.
#define PREPARE_MANIFEST_FORMAT \
    "# moe.c default corpus, format 1: document i goes to val when i % 20 == 19"
#define PREPARE_MANIFEST_HEADER "domain\tsplit\tfile\tbytes\tcrc32\tsources"

// Builds the corpus into out_dir unless data_default_ready(out_dir). Prints one progress
// line per domain. Returns 0, or -1 with a one-line error in err.
int data_prepare_default(const char *out_dir, char *err, size_t n);
// 1 when dir/MANIFEST.tsv is of the current format and lists every domain's train and
// val file with sizes and checksums that match the files; else 0.
int data_default_ready(const char *dir);

#endif
