"""The arrows between rooms (docs/architecture.md, "Arrows"): every project include in the
C, CUDA and C++ sources points to the file's own room or to a room below it.

Bottom up: base <- kernels <- model, optim, data, dist <- train/config <- train/formats <- train
<- train/cli. model, optim, data and dist (MPI) are peers and include none of each other; bench may
use everything but the CLI; tests may use everything.
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = (".c", ".h", ".cu", ".cuh", ".cpp", ".def")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)

LIBRARY = {"base", "kernels", "model", "optim", "data", "dist"}
TRAIN_LOWER = LIBRARY | {"train/config"}
ALLOWED = {
    "base": set(),
    "kernels": {"base"},
    "model": {"base", "kernels"},
    "optim": {"base", "kernels"},
    "data": {"base", "kernels"},
    "dist": {"base", "kernels"},
    "train/config": LIBRARY,
    "train/formats": TRAIN_LOWER,
    "train": TRAIN_LOWER | {"train/formats"},
    "train/cli": TRAIN_LOWER | {"train/formats", "train"},
    "bench": TRAIN_LOWER | {"train/formats", "train"},
}


def room_of(rel):
    """The room of a repository-relative path, or None outside the rooms (tests, build)."""
    parts = rel.split("/")
    if parts[0] == "train":
        if len(parts) > 2 and parts[1] in ("formats", "cli"):
            return "train/" + parts[1]
        if parts[-1] in ("config.c", "config.h"):
            return "train/config"
        return "train"
    return parts[0] if parts[0] in ALLOWED else None


def project_sources():
    for top in ALLOWED:
        base = os.path.join(ROOT, top.split("/")[0])
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.endswith(SOURCES):
                    yield os.path.relpath(os.path.join(dirpath, name), ROOT)


def arrows():
    """(file, its room, included file, that file's room) for every project include."""
    for rel in sorted(set(project_sources())):
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            text = f.read()
        for inc in INCLUDE.findall(text):
            target = os.path.normpath(os.path.join(os.path.dirname(rel), inc))
            if not os.path.exists(os.path.join(ROOT, target)):
                continue   # a system or generated header found on the include path
            yield rel, room_of(rel), target, room_of(target)


def test_every_include_points_down():
    seen, wrong = 0, []
    for src, room, target, target_room in arrows():
        seen += 1
        if target_room is None or (target_room != room and target_room not in ALLOWED[room]):
            wrong.append(f"{src} ({room}) includes {target} ({target_room})")
    assert seen > 100, f"only {seen} project includes found: is the scan broken?"
    assert not wrong, "includes against the room order:\n" + "\n".join(wrong)


def test_room_of_knows_the_rooms():
    assert room_of("train/formats/checkpoint.c") == "train/formats"
    assert room_of("train/cli/main.c") == "train/cli"
    assert room_of("train/config.h") == "train/config"
    assert room_of("train/step.c") == "train"
    assert room_of("kernels/cuda/router.cu") == "kernels"
    assert room_of("tests/testlib.c") is None
