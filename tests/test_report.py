"""The HTML pages: a run's report.html (end of `moe train`, `moe report RUN_DIR`) and
`moe route`'s route.html, loaded in headless Chromium from tiny runs.

References are independent of the page code: the run's own CSV files (metrics.csv,
tokens.csv), the PNG files gnuplot wrote (read by Pillow), Paul Tol's published 'light'
colour scheme, and what the browser itself measures and paints."""
import csv
import html
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from toy_domains import write_toy_domains

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))
CHROMIUM = shutil.which("chromium")
GNUPLOT = shutil.which("gnuplot")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or GNUPLOT is None,
    reason="chromium or gnuplot is not installed (make deps-test installs both)")

CONFIG = """
[model]
layers = 3
d_model = 16
heads = 2
kv_heads = 2
seq_len = 16
experts = 4
expert_ffn_dim = 16
[router]
top_k = 2
capacity_factor = 1.0
[train]
batch_size = 4
steps = 8
eval_every = 4
sample_tokens = 0
threads = 1
[data]
val_tokens = 512
[domain prose]
kind = text
train = {d}/prose/train.txt
val = {d}/prose/val.txt
[domain digits]
kind = text
train = {d}/digits/train.txt
val = {d}/digits/val.txt
"""
LAYERS, EXPERTS = 3, 4
SHOWN = 40   # --tokens of the routing page
# Paul Tol's 'light' scheme, in his order (https://personal.sron.nl/~pault/).
TOL_LIGHT = ["#77AADD", "#EE8866", "#EEDD88", "#FFAABB", "#99DDFF", "#44BB99", "#BBCC33",
             "#AAAA00"]
# report.html's figures and the sizes report.gp asks gnuplot for (3 MoE layers).
REPORT_FIGURES = {"loss": (900, 420), "lr": (900, 300), "aux": (900, 520),
                  "routing": (900, 520), "load": (900, 60 + 170 * LAYERS)}
REPORT_SECTIONS = ["summary", "startup", "loss", "lr", "aux", "routing", "load", "config"]
# Bytes a page must escape: markup characters, a newline, a tab, bytes that are not UTF-8.
ODD_TEXT = b'a<b>&"c\'\td\n\xff\xc3(\x01) ' * 12


def run_moe(args, env=None, check=True):
    run = subprocess.run([MOE] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=env)
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    write_toy_domains(tmp)
    (tmp / "odd.txt").write_bytes(ODD_TEXT)
    cfg = tmp / "tiny.ini"
    cfg.write_text(CONFIG.format(d=tmp))
    train = run_moe(["train", cfg, f"train.out_dir={tmp}", "train.name=run"])
    return tmp, train


@pytest.fixture(scope="module")
def routed(runs):
    tmp, _ = runs
    run_moe(["experts", tmp / "run", tmp / "prose" / "val.txt", "--csv", tmp / "esft.csv"])
    out = tmp / "route"
    run_moe(["route", tmp / "run", tmp / "prose" / "val.txt", tmp / "odd.txt", "--tokens",
             SHOWN, "--compare", tmp / "run", "--esft", tmp / "esft.csv", "--out", out])
    return out


# ---- the browser --------------------------------------------------------------------------

def chromium(tmp, page, *action, size=(1200, 1600)):
    """Chromium headless on page; returns its stdout and the console messages it logged
    (Chromium 156 logs every console message, errors included, as INFO:CONSOLE lines)."""
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", f"--user-data-dir={tmp / 'chromium-profile'}",
         "--enable-logging=stderr", "--v=0", f"--window-size={size[0]},{size[1]}",
         *action, page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    return run.stdout, console


# A test-only script, appended to a copy of a page: it measures what the browser laid out
# and painted (each inline SVG's box, each token's background in every layer the radio
# buttons select) and leaves it in the DOM as JSON for --dump-dom.
PROBE = """<script>
(function () {
  const out = {svgs: [], sections: {}, colours: []};
  for (const s of document.querySelectorAll('section')) {
    out.sections[s.id] = s.getBoundingClientRect().height;
  }
  for (const svg of document.querySelectorAll('figure svg')) {
    const r = svg.getBoundingClientRect();
    out.svgs.push([svg.closest('section').id, r.width, r.height]);
  }
  for (const radio of document.querySelectorAll('input[name=layer]')) {
    radio.checked = true;
    out.colours.push(Array.from(document.querySelectorAll('span.t'),
                                s => getComputedStyle(s).backgroundColor));
  }
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def probe(tmp, page):
    copy = tmp / ("probe-" + page.name)
    copy.write_text(page.read_text().replace("</body>", PROBE + "\n</body>"))
    dom, console = chromium(tmp, copy, "--dump-dom")
    assert console == []
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


class Spans(HTMLParser):
    """The token spans of a page: their classes, titles and text."""

    def __init__(self):
        super().__init__()
        self.spans, self.depth = [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and "t" in (a.get("class") or "").split():
            self.spans.append({"title": a.get("title", ""), "text": ""})
            self.depth = 1
        elif tag == "span" and self.depth:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag == "span" and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.spans[-1]["text"] += data


def parse_spans(text):
    p = Spans()
    p.feed(text)
    return p.spans


def png_size(path):
    from PIL import Image
    with Image.open(path) as im:
        im.load()   # decodes every row: a truncated or corrupt file raises
        return im.size


def rgb(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def screenshot_colours(path, size):
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == size
        return im.convert("RGB").getcolors(maxcolors=1 << 24)


# ---- the run report -----------------------------------------------------------------------

def test_training_writes_the_report(runs):
    tmp, train = runs
    run_dir = tmp / "run"
    assert f"report written to {run_dir}/report.html" in train.stdout
    page = (run_dir / "report.html").read_text()
    for section in REPORT_SECTIONS:
        assert f'<section id="{section}">' in page
    # self-contained: no script, nothing that loads from elsewhere
    assert "<script" not in page and "<img" not in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    # the start-up facts the run printed
    model_line = next(l for l in train.stdout.splitlines() if l.startswith("model: "))
    assert model_line in html.unescape(page)
    assert (run_dir / "startup.txt").read_text().splitlines()[1] == model_line


def test_report_final_numbers_are_the_last_metrics_rows(runs):
    tmp, _ = runs
    rows = read_csv(tmp / "run" / "metrics.csv")
    page = (tmp / "run" / "report.html").read_text()
    cells = dict(re.findall(r"<tr><th>(\w+)</th><td>([^<]*)</td></tr>", page))
    assert re.search(r"<th>after step</th><td>%d</td>" % (int(rows[-1]["step"]) + 1), page)
    for col in ("loss", "ce", "lr", "dropped", "maxvio", "entropy"):
        assert math.isclose(float(cells[col]), float(rows[-1][col]), rel_tol=1e-5), col
    last_eval = [r for r in rows if r["val_mean"]][-1]
    best = min((r for r in rows if r["val_mean"]), key=lambda r: float(r["val_mean"]))
    for col in ("val_prose", "val_digits", "val_mean"):
        got = re.search(rf"<th>{col}</th><td>([^<]*)</td><td>([^<]*)</td>", page)
        assert math.isclose(float(got.group(1)), float(last_eval[col]), rel_tol=1e-5)
        assert math.isclose(float(got.group(2)), float(best[col]), rel_tol=1e-5)


@needs_browser
def test_report_in_the_browser(runs, tmp_path):
    tmp, _ = runs
    page = tmp / "run" / "report.html"
    dom, console = chromium(tmp_path, page, "--dump-dom")
    assert console == []
    for section in REPORT_SECTIONS:
        assert f'<section id="{section}">' in dom
    measured = probe(tmp_path, page)
    assert all(h > 0 for h in measured["sections"].values())
    # every figure laid out at the size gnuplot drew it, and its PNG beside the page
    assert sorted(s for s, _, _ in measured["svgs"]) == sorted(REPORT_FIGURES)
    for section, width, height in measured["svgs"]:
        assert (width, height) == REPORT_FIGURES[section]
        assert png_size(tmp / "run" / f"{section}.png") == REPORT_FIGURES[section]
    shot = tmp_path / "report.png"
    chromium(tmp_path, page, f"--screenshot={shot}", size=(1000, 2400))
    colours = screenshot_colours(shot, (1000, 2400))
    assert len(colours) > 50   # not a blank page
    # the training-loss line, in the first Okabe-Ito colour report.gp gives it
    assert dict((c, n) for n, c in colours).get(rgb("#0072B2"), 0) > 100


def test_moe_report_rewrites_the_page(runs):
    tmp, _ = runs
    run_dir = tmp / "run"
    before = (run_dir / "report.html").read_text()
    (run_dir / "report.html").unlink()
    run = run_moe(["report", run_dir])
    assert run.stdout.startswith(f"report written to {run_dir}/report.html")
    assert (run_dir / "report.html").read_text() == before


def test_moe_report_refuses_a_directory_without_a_run(tmp_path):
    run = run_moe(["report", tmp_path], check=False)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path}/metrics.csv: cannot read" in lines[0]
    (tmp_path / "metrics.csv").write_text("step,lr,loss\n0,0.1,oops\n")
    run = run_moe(["report", tmp_path], check=False)
    assert run.returncode != 0
    assert "metrics.csv line 2, column loss: 'oops' is not a number" in run.stderr


def test_training_without_gnuplot_still_succeeds(runs, tmp_path):
    tmp, train = runs
    env = {**os.environ, "PATH": str(tmp_path)}   # no gnuplot there
    run = run_moe(["train", tmp / "tiny.ini", f"train.out_dir={tmp_path}", "train.name=bare"],
                  env=env)
    assert "figures not drawn: gnuplot not found on PATH" in run.stdout
    page = (tmp_path / "bare" / "report.html").read_text()
    assert page.count("Figure not drawn: gnuplot not found on PATH") == len(REPORT_FIGURES)
    assert '<section id="summary">' in page and "<svg" not in page
    # the progress and evaluation lines are those of the run with gnuplot
    strip = lambda out: [re.sub(r"\d+ tok/s|eta \S+", "", l) for l in out.splitlines()
                         if l.startswith(("step ", "eval step"))]
    assert strip(run.stdout) == strip(train.stdout)


# ---- the routing page ---------------------------------------------------------------------

def first_choices(rows):
    """{(domain, offset): [first-choice expert per layer]} from tokens.csv: the expert with
    the largest gate."""
    out = {}
    for r in rows:
        experts = [int(e) for e in r["experts"].split()]
        gates = [float(g) for g in r["gates"].split()]
        best = experts[max(range(len(gates)), key=lambda i: gates[i])] if experts else None
        out.setdefault((r["domain"], int(r["offset"])), []).append(best)
    return out


def test_route_page_spans_match_tokens_csv(routed):
    rows = read_csv(routed / "tokens.csv")
    page_bytes = (routed / "route.html").read_bytes()
    page = page_bytes.decode("utf-8")   # strict: no raw byte that is not UTF-8
    spans = parse_spans(page)
    tokens = first_choices(rows)
    assert len(spans) == len(tokens) == 2 * SHOWN
    by_token = {}
    for r in rows:
        by_token.setdefault((r["domain"], int(r["offset"])), []).append(r)
    for span, key in zip(spans, tokens):   # tokens.csv's order: domain, then offset
        layers = by_token[key]
        # the hover names every layer's experts, gates and drops, as tokens.csv has them
        title = span["title"].split("\n")
        assert title[0].endswith(f"offset {key[1]}") and len(title) == 1 + LAYERS
        for line, r in zip(title[1:], layers):
            assert line.startswith(f"layer {r['layer']}: ")
            got = re.findall(r" e(\d+) ([0-9.]+)( \(dropped\))?", line)
            assert [int(e) for e, _, _ in got] == [int(e) for e in r["experts"].split()]
            for (_, g, drop), want, kept in zip(got, r["gates"].split(), r["kept"].split()):
                assert abs(float(g) - float(want)) <= 6e-4
                assert (drop != "") == (kept == "0")


def test_route_page_escapes_the_text(routed):
    page = (routed / "route.html").read_text()
    odd = parse_spans(page)[SHOWN:]   # the second domain, odd.txt
    assert len(odd) == SHOWN
    for span, byte in zip(odd, ODD_TEXT[:SHOWN]):
        if byte == 10:
            assert span["text"] == "\u21b5"
        elif byte == 9 or 32 <= byte < 127:
            assert span["text"] == chr(byte)
        else:
            assert span["text"] == f"\\x{byte:02x}"
    assert "<b>" not in page and "&lt;" in page


@needs_browser
def test_route_page_in_the_browser(routed, tmp_path):
    page = routed / "route.html"
    rows = read_csv(routed / "tokens.csv")
    dom, console = chromium(tmp_path, page, "--dump-dom")
    assert console == []
    sections = ["text", "usage", "coactivation", "saturation", "esft"]
    for section in sections:
        assert f'<section id="{section}">' in dom
    assert len(parse_spans(dom)) == len(first_choices(rows))
    measured = probe(tmp_path, page)
    assert all(measured["sections"][s] > 0 for s in sections)
    for section, width, height in measured["svgs"]:
        assert png_size(routed / f"{section}.png") == (width, height)
    assert sorted(s for s, _, _ in measured["svgs"]) == ["coactivation", "esft", "usage"]
    # each token painted in its first-choice expert's colour, in every layer selected
    tokens = first_choices(rows)
    order = list(tokens)   # tokens.csv's order, the page's
    assert len(measured["colours"]) == LAYERS
    for layer, colours in enumerate(measured["colours"]):
        want = ["rgb(%d, %d, %d)" % rgb(TOL_LIGHT[tokens[k][layer]]) for k in order]
        assert colours == want, layer
    shot = tmp_path / "route.png"
    chromium(tmp_path, page, f"--screenshot={shot}", size=(1000, 1400))
    painted = {c for _, c in screenshot_colours(shot, (1000, 1400))}
    used = {tokens[k][0] for k in order}
    assert {rgb(TOL_LIGHT[e]) for e in used} <= painted


def test_route_refuses_a_bad_esft_file(runs, tmp_path):
    tmp, _ = runs
    bad = tmp_path / "esft.csv"
    bad.write_text("layer,expert,token_score,gate_score,selected\n0,9,0.5,0.5,1\n")
    run = run_moe(["route", tmp / "run", "--esft", bad, "--out", tmp_path / "out"],
                  check=False)
    assert run.returncode != 0
    assert f"{bad} line 2: expert 9 out of range (the checkpoint has 4 experts)" in run.stderr
    bad.write_text("layer,expert,score\n")
    run = run_moe(["route", tmp / "run", "--esft", bad, "--out", tmp_path / "out"],
                  check=False)
    assert f"{bad} line 1: column 3 is 'score', expected 'token_score'" in run.stderr


@needs_browser
def test_route_page_with_more_experts_than_colours(runs, tmp_path):
    """10 experts: the 8 most frequent first choices of a layer (ties to the lower expert)
    take Tol's colours in that order, the others pale grey."""
    tmp, _ = runs
    run_moe(["train", tmp / "tiny.ini", f"train.out_dir={tmp_path}", "train.name=wide",
             "model.experts=10", "train.steps=2", "train.eval_every=0"])
    out = tmp_path / "route"
    run_moe(["route", tmp_path / "wide", tmp / "prose" / "val.txt", "--tokens", 200,
             "--out", out])
    tokens = first_choices(read_csv(out / "tokens.csv"))
    measured = probe(tmp_path, out / "route.html")
    for layer, colours in enumerate(measured["colours"]):
        firsts = [tokens[k][layer] for k in tokens]
        ranked = sorted(set(firsts), key=lambda e: (-firsts.count(e), e))
        colour = {e: TOL_LIGHT[i] for i, e in enumerate(ranked[:8])}
        want = ["rgb(%d, %d, %d)" % rgb(colour.get(e, "#DDDDDD")) for e in firsts]
        assert colours == want, layer
    assert "grey: experts beyond the 8 colours" in (out / "route.html").read_text()


def test_report_of_a_run_cut_short(runs, tmp_path):
    """Two steps and no evaluation yet (a run stopped early): every figure is still drawn,
    without the columns that have no value."""
    tmp, _ = runs
    for name in ("metrics.csv", "experts.csv"):
        lines = (tmp / "run" / name).read_text().splitlines(keepends=True)
        keep = [l for l in lines[1:] if int(l.split(",")[0]) < 2]
        (tmp_path / name).write_text(lines[0] + "".join(keep))
    run = run_moe(["report", tmp_path])
    assert "figures not drawn" not in run.stdout
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == len(REPORT_FIGURES)
    assert "No evaluation yet." in page
    assert "startup.txt: not found" in page
