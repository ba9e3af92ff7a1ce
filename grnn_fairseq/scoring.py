"""ROUGE-1/2/L F1 for fairseq (``fairseq-generate ... --scoring rouge``) and a small CLI.

Scores come from Google's ``rouge-score`` (``rouge_scorer.RougeScorer`` with the Porter
stemmer): per-sentence F1, averaged over sentences, times 100.  Note that rouge-score's
default tokenizer lowercases and keeps only ``[a-z0-9]`` tokens.

CLI (``grnn-rouge`` or ``python -m grnn_fairseq.scoring``)::

    grnn-rouge --ref ref.txt --hyp hyp.txt [--json]
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass

__all__ = ["ROUGE_TYPES", "rouge", "format_scores", "main"]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}


def _scorer():
    from rouge_score import rouge_scorer, tokenizers

    # an explicit tokenizer (= rouge-score's default) also avoids absl's INFO line about it
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=True)
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True, tokenizer=tokenizer)


def rouge(refs, hyps):
    """Mean sentence-level F1 (x100) for each of :data:`ROUGE_TYPES`; 0 for no sentences."""
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    if not refs:
        return totals
    scorer = _scorer()
    for ref, hyp in zip(refs, hyps):
        # rouge-score gives F1 = 0 for an empty hypothesis (or reference)
        scores = scorer.score(ref or "", hyp or "")
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(refs) for key, total in totals.items()}


def format_scores(scores):
    """``ROUGE-1 35.12 ROUGE-2 16.40 ROUGE-L 32.90``."""
    return " ".join(f"{_LABELS[key]} {scores[key]:.2f}" for key in ROUGE_TYPES)


try:
    from fairseq.dataclass import FairseqDataclass
    from fairseq.scoring import SCORER_REGISTRY, BaseScorer, register_scorer
except ImportError:  # CLI and rouge() work without fairseq
    pass
else:

    @dataclass
    class RougeScorerConfig(FairseqDataclass):
        """No options: rouge-score with stemming, F1 averaged over sentences."""

    class RougeScorer(BaseScorer):
        """fairseq scorer: ROUGE-1/2/L F1 of detokenized hypotheses against references."""

        def __init__(self, cfg):
            super().__init__(cfg)
            self._cache = (None, None)

        def add_string(self, ref, pred):
            self.ref.append(ref)
            self.pred.append(pred)

        def scores(self):
            """Dict of ROUGE F1 (x100) over the sentences added so far."""
            n, cached = self._cache
            if n != len(self.ref):
                cached = rouge(self.ref, self.pred)
                self._cache = (len(self.ref), cached)
            return cached

        def score(self, metric="rougeL"):
            return self.scores()[metric]

        def result_string(self):
            return format_scores(self.scores())

    # `python -m grnn_fairseq.scoring` runs this file a second time, as __main__
    if "rouge" not in SCORER_REGISTRY:
        register_scorer("rouge", dataclass=RougeScorerConfig)(RougeScorer)


def _read_lines(path):
    """One sentence per line; a final newline does not add an empty sentence."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="grnn-rouge",
        description="ROUGE-1/2/L F1 (rouge-score, stemming, averaged over sentences, x100).",
    )
    parser.add_argument("--ref", required=True, help="references, one sentence per line")
    parser.add_argument("--hyp", required=True, help="hypotheses, one sentence per line")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    args = parser.parse_args(argv)
    texts = []
    for path in (args.ref, args.hyp):
        if os.path.isdir(path):
            parser.error(f"{path} is a directory: give a text file, one sentence per line")
        if not os.path.isfile(path):
            parser.error(f"no such file: {path}")
        try:
            texts.append(_read_lines(path))
        except UnicodeDecodeError as err:
            parser.error(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
                         f"offset {err.start}): give the detokenized text, one sentence per "
                         "line (e.g. the H- lines of fairseq-generate, cut -f3), not a "
                         "binarized or other-encoded file")
    refs, hyps = texts
    if len(refs) != len(hyps):
        parser.error(
            f"line counts differ: {args.ref} has {len(refs)} lines, {args.hyp} has {len(hyps)}"
        )
    scores = rouge(refs, hyps)
    if args.json:
        print(json.dumps({_LABELS[k]: round(v, 4) for k, v in scores.items()}))
    else:
        print(format_scores(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
