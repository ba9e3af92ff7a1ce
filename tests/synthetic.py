"""Made-up parallel data for end-to-end tests through fairseq's commands: the target is
the source reversed, each word s<i> renamed t<i> (learnable in a few hundred updates)."""
import random


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def write_reversal_corpus(raw, sizes, words, max_len, seed=0):
    """Write raw/{split}.de and raw/{split}.en for each (split, n) of ``sizes``."""
    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        src = [[rng.choice(words) for _ in range(rng.randint(3, max_len))] for _ in range(n)]
        write_lines(raw / f"{split}.de", [" ".join(s) for s in src])
        write_lines(raw / f"{split}.en", [" ".join("t" + w[1:] for w in reversed(s)) for s in src])
