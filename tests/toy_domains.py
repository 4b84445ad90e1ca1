"""The two toy domains that the route and report tests train on: prose of 19 words and
comma-separated digit triples, different enough that routing tells them apart."""

WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old "
         "tree near the river").split()
TEXTS = {"prose": " ".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(1200)),
         "digits": "".join(f"{i * 37 % 1000:03d}," for i in range(1500))}


def write_toy_domains(directory):
    """directory/NAME/train.txt and val.txt (the text reversed) for each domain."""
    for name, text in TEXTS.items():
        (directory / name).mkdir()
        (directory / name / "train.txt").write_text(text)
        (directory / name / "val.txt").write_text(text[::-1])
