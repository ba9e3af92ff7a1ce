"""Made-up parallel data for end-to-end tests through fairseq's commands: the target is
the source reversed, each word s<i> renamed t<i> (learnable in a few hundred updates)."""
import random


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def write_reversal_corpus(raw, sizes, words, max_len, seed=0, src_lang="de", reverse=True):
    """Write raw/{split}.{src_lang} and raw/{split}.en for each (split, n) of ``sizes``
    (with ``reverse=False`` the target keeps the source's word order)."""
    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        src = [[rng.choice(words) for _ in range(rng.randint(3, max_len))] for _ in range(n)]
        write_lines(raw / f"{split}.{src_lang}", [" ".join(s) for s in src])
        write_lines(raw / f"{split}.en", [" ".join("t" + w[1:] for w in (s[::-1] if reverse else s))
                                          for s in src])
