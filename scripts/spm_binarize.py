#!/usr/bin/env python
"""Sentencepiece + fairseq-preprocess for a folder of raw parallel text, such as the shipped
sample (data/debian-sample/deen or .../summ) or a corpus folder of prepare_debian.py.

    python scripts/spm_binarize.py data/debian-sample/deen work/quickstart/data --src de --tgt en
    python scripts/spm_binarize.py data/debian-sample/summ work/summ --src src --tgt tgt

RAW_DIR holds {train,valid,test}.{SRC,TGT}.  Writes OUT_DIR/spm (model and encoded text) and
OUT_DIR/data-bin (joined dictionary, spm.model copied in).  The steps are prepare_debian.py's
own: each is built in a temporary folder, renamed into place with a .done key (inputs and
options), skipped when up to date and rebuilt when anything changed.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare_debian as pd  # noqa: E402


def corpus_of(src, tgt):
    """prepare_debian's corpus name and language for a (src, tgt) pair of file suffixes."""
    if (src, tgt) == ("src", "tgt"):
        return "summ", "en"
    if tgt == "en" and src != "en":
        return "deen", src
    raise SystemExit(f"error: --src {src} --tgt {tgt}: use LANG -> en translation "
                     "(--src de --tgt en) or summarization (--src src --tgt tgt)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--src", required=True)
    p.add_argument("--tgt", required=True)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--spm-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--spm-sentences", type=int, default=2_000_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--force", action="store_true", help="rebuild steps that are up to date")
    a = p.parse_args(argv)
    if a.vocab_size < 1:
        p.error(f"--vocab-size={a.vocab_size}: the sentencepiece vocabulary needs at least one "
                "piece per character of the corpus, e.g. 4000")
    a.joined_dictionary = True
    corpus, lang = corpus_of(a.src, a.tgt)
    missing = [str(a.raw / f"{s}.{x}") for s in pd.SPLITS for x in (a.src, a.tgt)
               if not (a.raw / f"{s}.{x}").is_file()]
    if missing:
        sys.exit(f"error: missing raw files: {', '.join(missing)} (build them with "
                 "scripts/prepare-debian.sh or point RAW_DIR at a folder that has them)")
    raw_key = pd._digest([(f.name, f.stat().st_size, f.stat().st_mtime_ns)
                          for f in sorted(a.raw.iterdir()) if f.is_file()])
    spm_key = pd._digest({"raw": raw_key, "vocab": a.vocab_size, "type": a.spm_type,
                          "cov": a.character_coverage, "n": a.spm_sentences})
    try:
        pd.run_step(a.out / "spm", spm_key, a.force, "sentencepiece",
                    lambda tmp: pd.train_and_encode_spm(a.raw, tmp, corpus, lang, a))
        pd.run_step(a.out / "data-bin", pd._digest({"spm": spm_key}), a.force, "fairseq-preprocess",
                    lambda tmp: pd.binarize(a.out / "spm", tmp, corpus, lang, a))
    except pd.CorpusError as err:
        sys.exit(f"error: {err}")
    print(a.out / "data-bin")


if __name__ == "__main__":
    main()
