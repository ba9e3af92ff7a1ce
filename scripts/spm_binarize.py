#!/usr/bin/env python
"""Sentencepiece + fairseq-preprocess for a folder of raw parallel text.

    python scripts/spm_binarize.py RAW_DIR OUT_DIR --src de --tgt en --vocab-size 4000

RAW_DIR holds {train,valid,test}.{src,tgt} (one segment per line).  Writes OUT_DIR/spm.model,
OUT_DIR/spm/{split}.{lang} and OUT_DIR/data-bin (joined dictionary).  Finished steps are
skipped on a rerun; the data-bin is built in a temporary folder and renamed at the end,
so an interrupted run never leaves a data-bin that looks finished.
"""
import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

SPLITS = ("train", "valid", "test")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--src", required=True)
    p.add_argument("--tgt", required=True)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    missing = [str(a.raw / f"{s}.{l}") for s in SPLITS for l in (a.src, a.tgt)
               if not (a.raw / f"{s}.{l}").is_file()]
    if missing:
        sys.exit(f"error: missing raw files: {', '.join(missing)} (build them with "
                 "scripts/prepare-debian.sh or point RAW_DIR at a folder that has them)")
    import sentencepiece as spm

    a.out.mkdir(parents=True, exist_ok=True)
    model = a.out / "spm.model"
    if not model.exists():
        tmp_prefix = a.out / "spm.tmp"
        spm.SentencePieceTrainer.train(
            input=[str(a.raw / f"train.{l}") for l in (a.src, a.tgt)], model_prefix=str(tmp_prefix),
            vocab_size=a.vocab_size, model_type="unigram", character_coverage=1.0,
            input_sentence_size=200000, shuffle_input_sentence=True, minloglevel=2)
        os.replace(f"{tmp_prefix}.vocab", a.out / "spm.vocab")
        os.replace(f"{tmp_prefix}.model", model)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    enc = a.out / "spm"
    enc.mkdir(exist_ok=True)
    for s in SPLITS:
        for l in (a.src, a.tgt):
            dst = enc / f"{s}.{l}"
            if not dst.exists():
                lines = (a.raw / f"{s}.{l}").read_text(encoding="utf-8").splitlines()
                tmp = dst.with_suffix(dst.suffix + ".tmp")
                tmp.write_text("".join(" ".join(sp.encode(x, out_type=str)) + "\n" for x in lines),
                               encoding="utf-8")
                os.replace(tmp, dst)
    bin_dir = a.out / "data-bin"
    if not (bin_dir / ".done").exists():
        tmp = a.out / "data-bin.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["fairseq-preprocess", "--source-lang", a.src, "--target-lang", a.tgt,
                        "--trainpref", str(enc / "train"), "--validpref", str(enc / "valid"),
                        "--testpref", str(enc / "test"), "--destdir", str(tmp),
                        "--joined-dictionary", "--workers", str(a.workers)], check=True,
                       stdout=subprocess.DEVNULL)
        (tmp / ".done").touch()
        shutil.rmtree(bin_dir, ignore_errors=True)
        os.replace(tmp, bin_dir)
    print(bin_dir)


if __name__ == "__main__":
    main()
