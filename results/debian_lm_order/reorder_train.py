"""Re-order the training text of the Debian LM corpus, for the data-order experiment.

The training text of ``prepare_debian.py``'s LM corpus lists sentences description by
description, descriptions sorted by package family (``foo``, ``foo-doc``, ``libfoo1``,
``python3-foo`` are one family). This script rebuilds the same sentences with their
families (it checks that they equal ``raw/train.en`` line for line), re-orders them, encodes
them with the corpus's own sentencepiece model and binarizes them with its own dictionary.
Validation and test are linked unchanged, so perplexities stay comparable.

    python results/debian_lm_order/reorder_train.py --corpus data-bin/debian/lm \
        --order families --seed 1 --out data-bin/debian/lm_families_shuffled

--order families: whole families in a random order (each family's sentences keep theirs);
--order sentences: every sentence in a random order.
"""
import argparse
import random
import shutil
import subprocess
import sys
from itertools import groupby
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import prepare_debian as pd  # noqa: E402


def family_lines(src, raw_train):
    """[(family, sentence)] of the training split, in the corpus's order."""
    args = pd.parse_args(["--src", str(src), "--corpora", "lm"])
    files = pd.find_translation_files(args.src)
    en = pd.load_descriptions(files["en"], "en")
    pairs, counts = pd.build_pairs(args, en, None)
    train = pd.dedup_and_guard("lm", pairs["lm"], counts["lm"])["train"]
    lines = [(family, sent) for sent, _, family in train]
    want = raw_train.read_text(encoding="utf-8").splitlines()
    if [s for _, s in lines] != want:
        sys.exit(f"the rebuilt sentences differ from {raw_train}: rebuild the corpus with "
                 f"scripts/prepare_debian.py first (same --src, default options)")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=ROOT / "data-bin/debian/lm")
    p.add_argument("--src", default=str(ROOT.parent / "shared/data/debian-i18n"))
    p.add_argument("--order", choices=("families", "sentences"), required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    lines = family_lines(args.src, args.corpus / "raw/train.en")
    rng = random.Random(args.seed)
    if args.order == "families":
        blocks = [list(g) for _, g in groupby(lines, key=lambda x: x[0])]
        rng.shuffle(blocks)
        lines = [x for b in blocks for x in b]
        print(f"{len(blocks)} families shuffled")
    else:
        rng.shuffle(lines)
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "train.en").write_text("".join(s + "\n" for _, s in lines), encoding="utf-8")

    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(args.corpus / "spm/spm.model"))
    enc = args.out / "spm"
    enc.mkdir(exist_ok=True)
    with open(enc / "train.en", "w", encoding="utf-8") as f:
        for _, s in lines:
            f.write(" ".join(sp.encode(s, out_type=str)) + "\n")
    # the corpus's own pieces must come out for the same sentences
    orig = sorted((args.corpus / "spm/train.en").read_text(encoding="utf-8").splitlines())
    if sorted((enc / "train.en").read_text(encoding="utf-8").splitlines()) != orig:
        sys.exit("re-encoded sentences differ from the corpus's own spm/train.en")

    bin_dir = args.out / "data-bin"
    tmp = args.out / "data-bin.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([str(Path(sys.executable).parent / "fairseq-preprocess"), "--only-source",
                    "--trainpref", str(enc / "train.en"), "--destdir", str(tmp),
                    "--srcdict", str(args.corpus / "data-bin/dict.txt"), "--workers", "1"],
                   check=True)
    for split in ("valid", "test"):
        for ext in ("bin", "idx"):
            shutil.copy(args.corpus / f"data-bin/{split}.{ext}", tmp / f"{split}.{ext}")
    shutil.rmtree(bin_dir, ignore_errors=True)
    tmp.rename(bin_dir)
    print(f"wrote {bin_dir}")


if __name__ == "__main__":
    main()
