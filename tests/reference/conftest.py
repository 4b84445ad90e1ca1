"""Prints one line per reference case (worst relative error and which quantity) at the end
of the pytest run, in its own terminal-summary section, so it shows in plain `-q` output."""
import pytest

_LINES = []


@pytest.fixture
def reference_summary():
    def add(case, cmp):
        name, err = cmp.worst()
        routing = "topk/keep equal" if all(ok for ok, _ in cmp.exact.values()) else \
            "topk/keep DIFFER"
        _LINES.append(f"{case:<20} worst {err:.2e}  {name}  ({routing}, "
                      f"{cmp.dropped}/{cmp.assignments} dropped)")
    return add


@pytest.fixture
def reference_line():
    """Adds one free-form line to the same summary section."""
    return _LINES.append


def pytest_terminal_summary(terminalreporter):
    if _LINES:
        terminalreporter.section("moe.c vs the references (max relative error)")
        for line in _LINES:
            terminalreporter.write_line(line)
