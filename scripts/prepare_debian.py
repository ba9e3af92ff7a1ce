#!/usr/bin/env python3
"""Build translation, summarization and language-modeling corpora from Debian's
package-description translations (DDTP ``Translation-*`` files).

Input: a folder of ``Translation-<lang>`` files in deb822 format (as shipped in
``dists/<suite>/<component>/i18n/`` and cached by apt in ``/var/lib/apt/lists``),
plain or compressed with xz, gzip or bzip2.  Each paragraph looks like::

    Package: foo
    Description-md5: 0123456789abcdef0123456789abcdef
    Description-en: synopsis line
     long description, continuation lines start with a space
     .
     a line " ." separates paragraphs
      * indented lines are bullet items or verbatim text

Descriptions with the same ``Description-md5`` are translations of each other
(the md5 is computed over the original English description).

Output layout (``--out OUT``)::

    OUT/deen/raw/{train,valid,test}.{de,en}     parallel corpus  LANG -> en
    OUT/summ/raw/{train,valid,test}.{src,tgt}   long description -> synopsis (English)
    OUT/lm/raw/{train,valid,test}.en            English, one sentence per line
    OUT/<corpus>/raw/stats.{txt,json}           statistics of the corpus
    OUT/<corpus>/spm/                           with --spm: spm.model/.vocab + encoded files
    OUT/<corpus>/data-bin/                      with --binarize: fairseq-preprocess output
    OUT/stats.txt                               statistics of every corpus of the last run

(``deen`` is ``<lang>en`` for another ``--lang``.)  The summarization files use
the languages ``src``/``tgt`` so that fairseq's translation task reads them with
``--source-lang src --target-lang tgt``; the LM data-bin is built with
``--only-source`` and holds ``dict.txt`` + ``{train,valid,test}.{bin,idx}`` for
the ``language_modeling`` task.

Splits are made by *package family* (see ``family_key``) with a deterministic hash,
so that ``foo``, ``foo-data``, ``foo-doc``, ``libfoo2`` and ``python3-foo`` always
land in the same split.  Afterwards a leak guard drops from train (and from valid)
every pair whose source text -- and for summarization also whose target text --
occurs in a held-out split (exact match after lowercasing and whitespace
normalisation), so identical boilerplate shared by unrelated packages never
crosses a split boundary.

Every step writes into a temporary folder that is renamed into place with a
``.done`` marker, so an interrupted run never leaves something that a later run
takes for finished; a rerun skips finished steps whose parameters did not change,
and ``--force`` rebuilds them.

Example::

    python scripts/prepare_debian.py --src ../shared/data/debian-i18n --out data-bin/debian \\
        --spm --binarize --vocab-size 8000
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
import time
import unicodedata
import zlib
from collections import defaultdict
from pathlib import Path

VERSION = 1  # bump when the corpus construction changes (invalidates .done markers)
DEFAULT_APT_LISTS = "/var/lib/apt/lists"
SPLITS = ("train", "valid", "test")
CORPORA = ("deen", "summ", "lm")


class CorpusError(Exception):
    """A problem with the input or the environment, reported without a traceback."""


# --------------------------------------------------------------------------------------
# text utilities


_WS = re.compile(r"\s+")


def normalize_ws(text: str) -> str:
    """NFC-normalise, turn control characters into spaces, collapse whitespace."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text)
    return _WS.sub(" ", text).strip()


def match_key(text: str) -> str:
    """Key used for deduplication and the leak guard."""
    return _WS.sub(" ", text.lower()).strip()


def n_words(text: str) -> int:
    return len(text.split())


def _letters(text: str) -> int:
    return sum(1 for c in text if c.isalpha())


# Abbreviations (lower case, with the final dot) after which a sentence never ends.
# "etc." is deliberately absent: it ends sentences more often than not.
_ABBREVIATIONS = {
    # English
    "e.g.", "i.e.", "eg.", "ie.", "vs.", "cf.", "approx.", "incl.", "esp.", "resp.", "dr.",
    "mr.", "mrs.", "ms.", "prof.", "no.", "nos.", "vol.", "ver.", "fig.", "inc.", "ltd.",
    "corp.", "co.", "jr.", "sr.", "st.", "min.", "max.", "viz.", "al.", "ca.", "a.k.a.",
    # German
    "z.b.", "d.h.", "u.a.", "u.ä.", "o.ä.", "bzw.", "bspw.", "usw.", "evtl.", "ggf.",
    "ggfs.", "sog.", "vgl.", "inkl.", "nr.", "ca.", "engl.", "dt.", "zzgl.", "bzgl.",
    "v.a.", "s.", "z.t.", "u.u.", "mind.", "abs.", "insb.", "zb.", "dh.", "etw.",
}
_SENT_END = re.compile(r"[.!?…]+[\"'”’»«)\]]*(\s+)(?=[\"'“„‘»«(\[]?[A-ZÄÖÜ0-9])")


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence splitter for English and German description text.

    Splits after ``.``, ``!``, ``?`` followed by whitespace and an upper-case letter
    or a digit, except after known abbreviations, single letters (``A.``, the ``z.``
    of ``z. B.``), dotted initialisms (``e.g.``) and numbers (German ordinals ``1.``).
    """
    sentences = []
    start = 0
    for m in _SENT_END.finditer(text):
        end = m.start(1)  # end of the punctuation (+ closing quotes)
        head = text[start:end]
        word = head.rsplit(None, 1)[-1] if head.strip() else ""
        bare = word.lstrip("\"'“„‘»«([").lower()
        if bare.endswith("."):
            stem = bare.rstrip(".")
            if (
                bare in _ABBREVIATIONS
                or len(stem) <= 1
                or re.fullmatch(r"(?:\w\.)+\w?\.?", bare)
                or stem.isdigit()
            ):
                continue
        sent = text[start:end].strip()
        if sent:
            sentences.append(sent)
        start = m.end(1)
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


# --------------------------------------------------------------------------------------
# package families


_FAMILY_PREFIXES = (
    "python3-", "python-", "pypy3-", "pypy-", "golang-github-", "golang-gitlab-",
    "golang-gopkg-", "golang-", "ruby-", "node-", "r-cran-", "r-bioc-", "r-other-",
    "php-", "perl-", "lua-", "elpa-", "gir1.2-", "libghc-", "librust-", "libjs-",
    "libocaml-", "ocaml-", "haskell-", "fonts-", "xfonts-", "ttf-", "lib",
)
_FAMILY_SUFFIXES = (
    "-dev", "-doc", "-docs", "-data", "-common", "-utils", "-util", "-tools", "-bin",
    "-dbg", "-dbgsym", "-examples", "-perl", "-java", "-cil", "-ocaml", "-prof",
    "-static", "-runtime", "-headers", "-source", "-src", "-tests", "-test", "-core",
    "-base", "-l10n", "-i18n", "-locales", "-plugins", "-plugin", "-extra", "-extras",
    "-cli", "-gui", "-nox", "-all", "-full", "-minimal", "-dummy", "-api", "-shared",
    "-libs", "-lib", "-modules", "-module", "-demo", "-demos", "-tool", "-clojure", "-cross",
)
# One trailing version/soname component: "2", "-1.0", "6v5", "1t64", "0a", "3.11".
_FAMILY_VERSION = re.compile(r"[-._+]?\d+(?:t64|v5|c2a|c2|ldbl|gf|a)?$")
# Language-pack tails such as "-l10n-de", "-help-pt-br", "-i18n-zh-cn".
_FAMILY_LANGPACK = re.compile(r"-(?:l10n|i18n|help|locale|lang|hyphen|spell|mythes)(?:-[a-z]{2,3})+$")
# Multiarch / cross-toolchain tails such as "-i386", "-arm64-cross", "-mips64el-cross".
_FAMILY_ARCH = re.compile(
    r"-(?:i386|amd64|x32|arm64|armel|armhf|aarch64|i686|x86-64|s390x|riscv64|hppa|m68k|"
    r"alpha|sh4|sparc64|loong64|ppc64el|ppc64|powerpc|mips(?:64)?(?:r6)?(?:el)?|"
    r"mipsisa\w*|multilib|lib32|lib64|libx32)(?:-cross)?$")
# Versioned interpreter prefixes such as "php8.2-", "python3.11-", "lua5.1-", "ruby3.1-".
_FAMILY_VPREFIX = re.compile(r"^(?:php|python|pypy|ruby|lua|perl|tcl|tk|guile)\d+(?:\.\d+)*-")


def family_key(package: str) -> str:
    """Map a binary package name to the key that decides its split.

    Rule (applied to the lower-cased name until nothing changes; a step is skipped if
    it would leave fewer than 2 characters):

    0. Rust feature packages lose their ``+feature`` part (``librust-foo+bar-dev``);
    1. drop an architecture qualifier (``foo:amd64``), language-pack tails
       (``-l10n-de``, ``-help-pt-br``), multiarch/cross tails (``-i386``,
       ``-arm64-cross``) and versioned interpreter prefixes (``php8.2-``,
       ``python3.11-``);
    2. strip one packaging suffix: ``-dev -doc -data -common -utils -tools -bin -dbg
       -examples -perl -java ... -core -base -libs`` (see ``_FAMILY_SUFFIXES``);
    3. strip one ecosystem prefix: ``python3- python- golang-github- golang- ruby-
       node- r-cran- php- perl- elpa- gir1.2- libghc- librust- libjs- fonts- ... lib``;
    4. strip one trailing version / soname component: ``2``, ``-1.0``, ``1t64``,
       ``6v5`` (see ``_FAMILY_VERSION``).

    So ``foo``, ``foo-data``, ``foo-doc``, ``libfoo2``, ``libfoo-dev``,
    ``libfoo1t64``, ``python3-foo`` and ``gir1.2-foo-1.0`` all map to ``foo``.
    Unrelated packages may occasionally share a key (that only makes a family
    bigger); related packages with different stems (``foo`` vs ``foobar-extras``)
    are not joined -- the exact-match leak guard covers their shared boilerplate.
    """
    key = package.strip().lower().split(":", 1)[0]
    if key.startswith("librust-") and "+" in key:  # Rust feature packages: librust-foo+bar-dev
        key = key.split("+", 1)[0]
    for _ in range(20):
        before = key
        for rx in (_FAMILY_LANGPACK, _FAMILY_ARCH):
            m = rx.search(key)
            if m and m.start() >= 2:
                key = key[: m.start()]
        for suf in _FAMILY_SUFFIXES:
            if key.endswith(suf) and len(key) - len(suf) >= 2:
                key = key[: -len(suf)]
                break
        m = _FAMILY_VPREFIX.match(key)
        if m and len(key) - m.end() >= 2:
            key = key[m.end():]
        for pre in _FAMILY_PREFIXES:
            if key.startswith(pre) and len(key) - len(pre) >= 2:
                key = key[len(pre):]
                break
        m = _FAMILY_VERSION.search(key)
        if m and m.start() >= 2:
            key = key[: m.start()]
        key = key.strip("-._+")
        if key == before:
            break
    return key or package.lower()


def split_of(family: str, valid_frac: float, test_frac: float, seed: str = "") -> str:
    """Deterministic split of a family: a hash of the key mapped to [0, 1)."""
    digest = hashlib.sha256(f"{seed}\x00{family}".encode("utf-8")).hexdigest()
    u = int(digest[:15], 16) / float(16 ** 15)
    if u < valid_frac:
        return "valid"
    if u < valid_frac + test_frac:
        return "test"
    return "train"


# --------------------------------------------------------------------------------------
# reading Translation files


_TRANSLATION_NAME = re.compile(r"Translation-([A-Za-z0-9_@]+?)(?:\.(xz|gz|bz2|lz4|zst))?$")
_HOW_TO_GET = (
    "apt keeps them in /var/lib/apt/lists/*_i18n_Translation-<lang> once the languages are "
    "enabled: run `apt-get update -o Acquire::Languages=en,{lang}` (or set "
    "Acquire::Languages in /etc/apt/apt.conf.d/), or download "
    "dists/<suite>/main/i18n/Translation-{{en,{lang}}}.xz from a Debian mirror "
    "and pass the folder with --src DIR."
)


def find_translation_files(src: str | None) -> dict[str, list[Path]]:
    """Return ``{lang: [paths]}`` of the Translation files in ``src``."""
    folder = Path(src if src is not None else DEFAULT_APT_LISTS)
    if not folder.exists():
        hint = _HOW_TO_GET.format(lang="de")
        raise CorpusError(f"source folder {folder} does not exist. Pass --src DIR with the "
                          f"Translation-* files; {hint}")
    if not folder.is_dir():
        raise CorpusError(f"--src {folder} is not a folder; pass the folder that holds the "
                          f"Translation-* files")
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        m = _TRANSLATION_NAME.search(path.name)
        if m and "Translation-" in path.name:
            found[m.group(1)].append(path)
    return dict(found)


def _open_bytes(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if magic.startswith(b"\x04\x22\x4d\x18"):
        try:
            import lz4.frame  # type: ignore
        except ImportError:
            raise CorpusError(f"{path} is lz4-compressed and the lz4 module is missing: "
                              f"`pip install lz4` or decompress it with `lz4 -d`") from None
        return lz4.frame.open(path, "rb")
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        raise CorpusError(f"{path} is zstd-compressed: decompress it with `zstd -d` first")
    return open(path, "rb")


def iter_paragraphs(path: Path):
    """Yield deb822 paragraphs of ``path`` as ``{field: [first_line, continuation...]}``."""
    try:
        with _open_bytes(path) as raw:
            fields: dict[str, list[str]] = {}
            current: list[str] | None = None
            for bline in raw:
                line = bline.decode("utf-8", errors="replace").rstrip("\r\n")
                if not line.strip():
                    if fields:
                        yield fields
                    fields, current = {}, None
                    continue
                if line[0] in " \t":
                    if current is not None:
                        current.append(line)
                    continue
                if line.startswith("#"):
                    continue
                name, sep, value = line.partition(":")
                if not sep:
                    raise CorpusError(f"{path}: not a deb822 Translation file (line {line[:60]!r} "
                                      f"is neither 'Field: value' nor a continuation line)")
                current = [value.strip()]
                fields[name.strip()] = current
            if fields:
                yield fields
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise CorpusError(f"{path} disappeared while reading it") from None
        raise CorpusError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}). Download it "
            f"again (rerun apt-get update, or copy the complete file from the mirror) and "
            f"check it with `xz -t {path}`." if path.suffix == ".xz" else
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); download it again."
        ) from None


class Description:
    __slots__ = ("md5", "synopsis", "long", "packages")

    def __init__(self, md5: str, synopsis: str, long: list[str]):
        self.md5 = md5
        self.synopsis = synopsis
        self.long = long
        self.packages: list[str] = []


def load_descriptions(paths: list[Path], lang: str) -> dict[str, Description]:
    """Read ``Description-<lang>`` entries of ``paths`` keyed by Description-md5."""
    field = f"Description-{lang}"
    out: dict[str, Description] = {}
    for path in paths:
        n = 0
        for para in iter_paragraphs(path):
            desc = para.get(field)
            md5 = para.get("Description-md5")
            pkg = para.get("Package")
            if desc is None:  # fall back to any Description-xx field
                for k, v in para.items():
                    if k.startswith("Description-") and k != "Description-md5":
                        desc = v
                        break
            if desc is None or not md5 or not md5[0]:
                continue
            n += 1
            key = md5[0].lower()
            d = out.get(key)
            if d is None:
                d = out[key] = Description(key, desc[0], desc[1:])
            if pkg and pkg[0] and pkg[0] not in d.packages:
                d.packages.append(pkg[0])
        if n == 0:
            raise CorpusError(f"{path} holds no '{field}' descriptions with a Description-md5: "
                              f"is it a Debian Translation-{lang} file?")
    return out


# --------------------------------------------------------------------------------------
# description structure


_BULLET = re.compile(r"^(?P<indent>\s*)(?:[*+•·‣◦▪–-]|o|\d{1,2}[.)]|\([a-z0-9]\))\s+(?P<text>\S.*)$")
_RULE_ONLY = re.compile(r"^[\W_]+$")


def parse_long(lines: list[str]) -> list[str]:
    """Split continuation lines of a description into units (paragraphs and list items).

    ``" ."`` separates paragraphs; a bullet line (``*``, ``-``, ``+``, ``o``, ``1.``,
    ``(a)``) starts a list item whose marker is removed and whose continuation lines
    (indented deeper, or a lower-case line after an unterminated item) are joined to it;
    indented non-bullet lines (verbatim text) form their own unit.  Lines made only of
    punctuation (rulers) separate units; units with fewer than two letters are dropped.
    """
    blocks: list[list] = []  # [kind, indent, [lines]]
    cur: list | None = None
    for raw in lines:
        line = raw[1:] if raw.startswith(" ") else raw.lstrip("\t")
        stripped = line.strip()
        if not stripped or stripped == ".":
            cur = None
            continue
        if _RULE_ONLY.match(stripped):  # ruler / ASCII decoration: a separator
            cur = None
            continue
        indent = len(line) - len(line.lstrip())
        m = _BULLET.match(line)
        if m:
            cur = ["item", indent, [m.group("text").strip()]]
            blocks.append(cur)
            continue
        if cur is not None and cur[0] == "item":
            last = cur[2][-1]
            if indent > cur[1] or (stripped[0].islower() and last[-1:] not in ".!?:;"):
                cur[2].append(stripped)
                continue
        kind = "text" if indent == 0 else "verbatim"
        if cur is not None and cur[0] == kind:
            cur[2].append(stripped)
        else:
            cur = [kind, indent, [stripped]]
            blocks.append(cur)
    units = []
    for _, _, parts in blocks:
        text = normalize_ws(" ".join(parts))
        if _letters(text) >= 2 and not _RULE_ONLY.match(text):
            units.append(text)
    return units


# --------------------------------------------------------------------------------------
# corpus construction


def _len_ok(src: str, tgt: str, ratio: float) -> bool:
    ls, lt = len(src), len(tgt)
    if max(ls, lt) < 30:
        return True
    return 1.0 / ratio <= (ls + 1) / (lt + 1) <= ratio


def _description_family(d: Description) -> tuple[str, str]:
    pkg = min(d.packages) if d.packages else d.md5
    return family_key(pkg), pkg


def build_pairs(args, en: dict[str, Description], xx: dict[str, Description] | None):
    """Return ``{corpus: {split: [(src, tgt[, family])...]}}`` before dedup, plus counters."""
    corpora = {c: {s: [] for s in SPLITS} for c in args.corpora}
    counts: dict[str, dict[str, int]] = {c: defaultdict(int) for c in args.corpora}
    order = sorted(en.values(), key=lambda d: (_description_family(d), d.md5))
    for d in order:
        family, _ = _description_family(d)
        split = split_of(family, args.valid_frac, args.test_frac, args.split_seed)
        en_syn = normalize_ws(d.synopsis)
        en_units = parse_long(d.long)
        if "summ" in corpora:
            doc = " ".join(en_units)
            c = counts["summ"]
            c["candidates"] += 1
            if not en_syn:
                c["drop_empty_synopsis"] += 1
            elif n_words(doc) < args.summ_min_words:
                c["drop_short_doc"] += 1
            elif args.summ_max_words and n_words(doc) > args.summ_max_words:
                c["drop_long_doc"] += 1
            elif match_key(doc) == match_key(en_syn):
                c["drop_identical"] += 1
            else:
                corpora["summ"][split].append((doc, en_syn, family))
        if "lm" in corpora:
            for unit in en_units:
                for sent in split_sentences(unit):
                    counts["lm"]["candidates"] += 1
                    if args.max_words and n_words(sent) > args.max_words:
                        counts["lm"]["drop_long"] += 1
                        continue
                    corpora["lm"][split].append((sent, None, family))
        if "deen" in corpora and xx is not None:
            other = xx.get(d.md5)
            if other is None:
                continue
            c = counts["deen"]
            c["aligned_descriptions"] += 1
            cand = [(normalize_ws(other.synopsis), en_syn)]
            xx_units = parse_long(other.long)
            if xx_units and len(xx_units) == len(en_units):
                c["aligned_long"] += 1
                for su, tu in zip(xx_units, en_units):
                    ss, ts = split_sentences(su), split_sentences(tu)
                    if len(ss) == len(ts) and len(ss) > 1:
                        c["units_split_into_sentences"] += 1
                        cand.extend(zip(ss, ts))
                    else:
                        cand.append((su, tu))
            elif xx_units or en_units:
                c["long_unit_count_mismatch"] += 1
            for s, t in cand:
                c["candidates"] += 1
                if not s or not t or _letters(s) < 2 or _letters(t) < 2:
                    c["drop_empty"] += 1
                elif args.max_words and (n_words(s) > args.max_words or n_words(t) > args.max_words):
                    c["drop_long"] += 1
                elif not _len_ok(s, t, args.max_len_ratio):
                    c["drop_len_ratio"] += 1
                elif match_key(s) == match_key(t) and n_words(s) >= 4:
                    c["drop_untranslated"] += 1
                else:
                    corpora["deen"][split].append((s, t, family))
    return corpora, counts


def dedup_and_guard(corpus: str, splits: dict[str, list], counts: dict[str, int]):
    """Deduplicate on the source side inside each split, then apply the leak guard:
    test wins over valid, valid over train.  For summarization the target side is
    guarded as well (a synopsis seen in test never appears in train/valid)."""
    guard_target = corpus == "summ"
    out = {}
    for split in SPLITS:
        seen = set()
        kept = []
        for item in splits[split]:
            k = match_key(item[0])
            if k in seen:
                counts[f"drop_duplicate_{split}"] += 1
                continue
            seen.add(k)
            kept.append(item)
        out[split] = kept
    held_src: set[str] = set()
    held_tgt: set[str] = set()
    for split in ("test", "valid", "train"):
        if held_src or held_tgt:
            kept = []
            for item in out[split]:
                if match_key(item[0]) in held_src or (
                    guard_target and match_key(item[1]) in held_tgt
                ):
                    counts[f"drop_leak_{split}"] += 1
                    continue
                kept.append(item)
            out[split] = kept
        held_src.update(match_key(it[0]) for it in out[split])
        if guard_target:
            held_tgt.update(match_key(it[1]) for it in out[split])
    return out


def corpus_files(corpus: str, lang: str) -> tuple[str, str | None]:
    """File suffixes (source, target) of a corpus."""
    if corpus == "deen":
        return lang, "en"
    if corpus == "summ":
        return "src", "tgt"
    return "en", None


def corpus_dirname(corpus: str, lang: str) -> str:
    return f"{lang}en" if corpus == "deen" else corpus


def side_stats(lines: list[str]) -> dict:
    vocab = set()
    tokens = 0
    for line in lines:
        toks = line.split()
        tokens += len(toks)
        vocab.update(toks)
    return {"tokens": tokens, "vocab": len(vocab)}


def corpus_stats(corpus: str, lang: str, splits: dict[str, list], counts: dict) -> dict:
    sx, tx = corpus_files(corpus, lang)
    stats = {"corpus": corpus, "splits": {}, "filter_counts": dict(sorted(counts.items()))}
    for split in SPLITS:
        items = splits[split]
        entry = {"pairs" if tx else "lines": len(items),
                 "families": len({it[2] for it in items}) if items and len(items[0]) > 2 else None,
                 sx: side_stats([it[0] for it in items])}
        if tx:
            entry[tx] = side_stats([it[1] for it in items])
        stats["splits"][split] = entry
    return stats


def format_stats(stats: dict, lang: str) -> str:
    corpus = stats["corpus"]
    sx, tx = corpus_files(corpus, lang)
    unit = "pairs" if tx else "lines"
    lines = [f"[{corpus_dirname(corpus, lang)}] "
             + {"deen": f"{lang}->en translation", "summ": "summarization (long description -> synopsis)",
                "lm": "English language modeling"}[corpus]]
    head = f"  {'split':<6} {unit:>8} {'families':>8}  {sx + ' tokens':>12} {sx + ' vocab':>10}"
    if tx:
        head += f"  {tx + ' tokens':>12} {tx + ' vocab':>10}"
    lines.append(head)
    for split in SPLITS:
        e = stats["splits"][split]
        fam = "-" if e["families"] is None else e["families"]
        row = (f"  {split:<6} {e[unit]:>8} {fam:>8}  {e[sx]['tokens']:>12} "
               f"{e[sx]['vocab']:>10}")
        if tx:
            row += f"  {e[tx]['tokens']:>12} {e[tx]['vocab']:>10}"
        lines.append(row)
    fc = stats.get("filter_counts") or {}
    if fc:
        lines.append("  counts: " + ", ".join(f"{k}={v}" for k, v in fc.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# atomic steps


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_done(final: Path, key: str) -> bool:
    marker = final / ".done"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("key") == key
    except (ValueError, OSError):
        return False


def step_state(final: Path, key: str) -> str:
    if step_done(final, key):
        return "done"
    if (final / ".done").is_file():
        return "stale"  # finished with other parameters / inputs
    if final.exists():
        return "partial"
    return "missing"


def run_step(final: Path, key: str, force: bool, label: str, builder) -> bool:
    """Run ``builder(tmpdir)`` and move the result to ``final`` atomically.
    Returns True if the step ran, False if it was skipped as already done."""
    state = step_state(final, key)
    if state == "done" and not force:
        log(f"{label}: up to date in {final} (skipped; --force rebuilds)")
        return False
    if state == "stale" and not force:
        log(f"{label}: inputs or parameters changed since {final} was built; rebuilding")
    elif state == "partial":
        log(f"{label}: {final} has no .done marker (interrupted run?); rebuilding")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.time()
    try:
        builder(tmp)
        (tmp / ".done").write_text(json.dumps({"key": key, "step": label}) + "\n")
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{label}: built {final} in {time.time() - t0:.1f}s")
    return True


def clean_stale_tmp(out: Path):
    """Remove temporary folders left by interrupted runs (only our own naming, only of
    processes that are gone) in ``out`` and its subfolders."""
    if not out.is_dir():
        return
    for pattern in (".*.tmp-*", "*/.*.tmp-*", ".*.old-*", "*/.*.old-*"):
        for d in out.glob(pattern):
            pid = d.name.rsplit("-", 1)[-1]
            if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def write_lines(path: Path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for line in lines:
            fh.write(line)
            fh.write("\n")


def read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh]


# --------------------------------------------------------------------------------------
# sentencepiece + fairseq-preprocess


def train_and_encode_spm(raw: Path, tmp: Path, corpus: str, lang: str, args):
    try:
        import sentencepiece as spm
    except ImportError:
        raise CorpusError("--spm needs the sentencepiece module: pip install sentencepiece") from None
    sx, tx = corpus_files(corpus, lang)
    exts = [sx] + ([tx] if tx else [])
    inputs = [str(raw / f"train.{e}") for e in exts]
    if all(os.path.getsize(p) == 0 for p in inputs):
        raise CorpusError(f"{raw}: the train split is empty; cannot train sentencepiece")
    try:
        _train_spm(spm, inputs, tmp, args)
    except RuntimeError as err:  # sentencepiece's own check, e.g. a vocabulary below the characters
        why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        why = why.rsplit("] ", 1)[-1]  # drop "INTERNAL: src/trainer_interface.cc(...) [check]"
        raise CorpusError(f"--vocab-size={args.vocab_size}: sentencepiece cannot train on "
                          f"{raw} ({why}); use a larger --vocab-size (it must hold every "
                          f"character kept by --character-coverage) or a lower "
                          f"--character-coverage") from None
    sp = spm.SentencePieceProcessor(model_file=str(tmp / "spm.model"))
    for split in SPLITS:
        for e in exts:
            lines = read_lines(raw / f"{split}.{e}")
            pieces = sp.encode(lines, out_type=str) if lines else []
            write_lines(tmp / f"{split}.{e}", (" ".join(p) for p in pieces))


def _train_spm(spm, inputs, tmp, args):
    spm.SentencePieceTrainer.train(
        input=",".join(inputs),
        model_prefix=str(tmp / "spm"),
        vocab_size=args.vocab_size,
        model_type=args.spm_type,
        character_coverage=args.character_coverage,
        input_sentence_size=args.spm_sentences,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        num_threads=max(1, args.workers),
        minloglevel=2,
        seed_sentencepiece_size=min(1000000, max(10000, args.spm_sentences)),
    )


def preprocess_command() -> list[str]:
    exe = Path(sys.executable).parent / "fairseq-preprocess"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("fairseq-preprocess")
    if found:
        return [found]
    try:
        import importlib.util
        if importlib.util.find_spec("fairseq_cli") is not None:
            return [sys.executable, "-m", "fairseq_cli.preprocess"]
    except (ImportError, ValueError):
        pass
    raise CorpusError("--binarize needs fairseq (fairseq-preprocess not found next to "
                      f"{sys.executable} nor on PATH): install fairseq or drop --binarize")


def binarize(spm_dir: Path, tmp: Path, corpus: str, lang: str, args):
    sx, tx = corpus_files(corpus, lang)
    cmd = preprocess_command()
    if tx:
        cmd += ["--source-lang", sx, "--target-lang", tx,
                "--trainpref", str(spm_dir / "train"), "--validpref", str(spm_dir / "valid"),
                "--testpref", str(spm_dir / "test")]
        if args.joined_dictionary:
            cmd.append("--joined-dictionary")
    else:
        cmd += ["--only-source", "--trainpref", str(spm_dir / f"train.{sx}"),
                "--validpref", str(spm_dir / f"valid.{sx}"), "--testpref", str(spm_dir / f"test.{sx}")]
    cmd += ["--destdir", str(tmp), "--workers", str(max(1, args.workers))]
    log("  $ " + " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (tmp / "preprocess.log").write_text(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise CorpusError(f"fairseq-preprocess failed for {corpus} (exit {proc.returncode}):\n{tail}")
    shutil.copy(spm_dir / "spm.model", tmp / "spm.model")


# --------------------------------------------------------------------------------------
# sample


def write_sample(out: Path, sample_dir: Path, args):
    sizes = dict(zip(SPLITS, args.sample_sizes))
    clean_stale_tmp(sample_dir)
    rng_seed = args.sample_seed
    summary = []
    for corpus in ("deen", "summ"):
        if corpus not in args.corpora:
            continue
        sx, tx = corpus_files(corpus, args.lang)
        raw = out / corpus_dirname(corpus, args.lang) / "raw"
        name = corpus_dirname(corpus, args.lang)

        def build(tmp: Path, corpus=corpus, sx=sx, tx=tx, raw=raw, name=name):
            picked = {}
            for split in SPLITS:
                src = read_lines(raw / f"{split}.{sx}")
                tgt = read_lines(raw / f"{split}.{tx}")
                limit = args.sample_max_words
                idx = [i for i in range(len(src))
                       if n_words(src[i]) <= limit and n_words(tgt[i]) <= limit]
                rng = random.Random(f"{rng_seed}:{corpus}:{split}")
                if len(idx) > sizes[split]:
                    idx = sorted(rng.sample(idx, sizes[split]))
                write_lines(tmp / f"{split}.{sx}", (src[i] for i in idx))
                write_lines(tmp / f"{split}.{tx}", (tgt[i] for i in idx))
                picked[split] = [(src[i], tgt[i]) for i in idx]
                summary.append(f"{name} {split}: {len(idx)} pairs")
            stats = corpus_stats(corpus, args.lang, picked, {})
            (tmp / "stats.txt").write_text(format_stats(stats, args.lang) + "\n")

        key = _digest({"v": VERSION, "raw": json.loads((raw / ".done").read_text())["key"],
                       "sizes": args.sample_sizes, "max": args.sample_max_words, "seed": rng_seed})
        run_step(sample_dir / name, key, args.force, f"sample {name}", build)
    if summary:
        for line in summary:
            log("  " + line)


# --------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="prepare_debian.py",
        description="Build LANG->en translation, summarization and English LM corpora from "
                    "Debian's package-description translations (Translation-* files).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Splits are by package family (foo, foo-doc, libfoo2, python3-foo share one); "
               "a leak guard removes from train any source (summarization: also target) text "
               "that occurs in valid/test.  Finished steps are skipped on rerun unless --force.",
    )
    p.add_argument("--src", default=None,
                   help=f"folder with Translation-<lang>[.xz|.gz|.bz2] files "
                        f"(default: apt's lists in {DEFAULT_APT_LISTS})")
    p.add_argument("--out", default="data-bin/debian", help="output folder")
    p.add_argument("--lang", default="de", help="source language of the translation corpus")
    p.add_argument("--corpora", default="deen,summ,lm",
                   help="comma-separated subset of: deen (LANG->en), summ, lm")
    p.add_argument("--valid-frac", type=float, default=0.015, help="fraction of families in valid")
    p.add_argument("--test-frac", type=float, default=0.015, help="fraction of families in test")
    p.add_argument("--split-seed", default="debian-v1", help="salt of the family hash")
    p.add_argument("--max-words", type=int, default=200,
                   help="drop translation pairs / LM lines longer than this (0: no limit)")
    p.add_argument("--max-len-ratio", type=float, default=3.0,
                   help="drop translation pairs whose character-length ratio exceeds this")
    p.add_argument("--summ-min-words", type=int, default=10,
                   help="drop summarization pairs whose long description has fewer words")
    p.add_argument("--summ-max-words", type=int, default=400,
                   help="drop summarization pairs whose long description has more words (0: no limit)")
    g = p.add_argument_group("subword + binarization (optional)")
    g.add_argument("--spm", action="store_true", help="train sentencepiece per corpus and encode")
    g.add_argument("--binarize", action="store_true",
                   help="run fairseq-preprocess into OUT/<corpus>/data-bin (implies --spm)")
    g.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size")
    g.add_argument("--spm-type", default="unigram", choices=["unigram", "bpe"])
    g.add_argument("--character-coverage", type=float, default=0.9995,
                   help="sentencepiece character coverage")
    g.add_argument("--spm-sentences", type=int, default=1000000,
                   help="at most this many training lines are used to train sentencepiece")
    g.add_argument("--no-joined-dictionary", dest="joined_dictionary", action="store_false",
                   help="separate source/target fairseq dictionaries (the default is joined)")
    g.add_argument("--workers", type=int, default=1,
                   help="threads for sentencepiece / workers for fairseq-preprocess")
    s = p.add_argument_group("sample")
    s.add_argument("--sample", metavar="DIR", default=None,
                   help="also write a small raw sample of the deen/summ splits to DIR/<corpus>/")
    s.add_argument("--sample-sizes", default="3000,200,200", help="train,valid,test pairs")
    s.add_argument("--sample-max-words", type=int, default=60,
                   help="only pairs whose both sides have at most this many words")
    s.add_argument("--sample-seed", default="1", help="seed of the random sample")
    p.add_argument("--force", action="store_true",
                   help="rebuild steps that are already done (otherwise they are skipped)")
    args = p.parse_args(argv)
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    bad = [c for c in corpora if c not in CORPORA]
    if bad or not corpora:
        p.error(f"--corpora: unknown {bad}; choose from {','.join(CORPORA)}")
    args.corpora = corpora
    try:
        args.sample_sizes = [int(x) for x in args.sample_sizes.split(",")]
        assert len(args.sample_sizes) == 3
    except (ValueError, AssertionError):
        p.error("--sample-sizes must be three integers: train,valid,test")
    if not (0 <= args.valid_frac < 1 and 0 <= args.test_frac < 1 and args.valid_frac + args.test_frac < 1):
        p.error("--valid-frac and --test-frac must be in [0, 1) with a sum below 1")
    if args.vocab_size < 1:
        p.error(f"--vocab-size={args.vocab_size}: the sentencepiece vocabulary needs at least one "
                "piece per character of the corpus, e.g. 8000")
    if args.binarize:
        args.spm = True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except CorpusError as exc:
        print(f"prepare_debian.py: error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    out = Path(args.out)
    lang = args.lang
    files = find_translation_files(args.src)
    where = args.src if args.src is not None else DEFAULT_APT_LISTS
    hint = _HOW_TO_GET.format(lang=lang)
    if "en" not in files:
        raise CorpusError(f"no Translation-en file in {where}. {hint}")
    if "deen" in args.corpora and lang not in files:
        have = ", ".join(sorted(files)) or "none"
        raise CorpusError(f"no Translation-{lang} file in {where} (languages found: {have}). {hint}")
    used = sorted(files["en"] + (files[lang] if "deen" in args.corpora else []))
    inputs = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in used]
    log(f"input: {', '.join(str(p) for p in used)}")
    clean_stale_tmp(out)

    raw_params = {
        "v": VERSION, "code": _digest(Path(__file__).read_text(encoding="utf-8")), "inputs": inputs, "lang": lang, "valid": args.valid_frac,
        "test": args.test_frac, "seed": args.split_seed, "max_words": args.max_words,
        "ratio": args.max_len_ratio, "summ_min": args.summ_min_words, "summ_max": args.summ_max_words,
    }
    raw_keys = {c: _digest({**raw_params, "corpus": c}) for c in args.corpora}
    dirs = {c: out / corpus_dirname(c, lang) for c in args.corpora}
    pending = [c for c in args.corpora if args.force or not step_done(dirs[c] / "raw", raw_keys[c])]

    all_stats = {}
    if pending:
        t0 = time.time()
        en = load_descriptions(files["en"], "en")
        xx = load_descriptions(files[lang], lang) if "deen" in pending else None
        log(f"read {len(en)} English descriptions"
            + (f", {len(xx)} Translation-{lang} descriptions" if xx is not None else "")
            + f" in {time.time() - t0:.1f}s")
        if xx is not None:
            common = len(set(en) & set(xx))
            if common == 0:
                raise CorpusError(
                    f"no Description-md5 of Translation-{lang} matches one of Translation-en in "
                    f"{where}: the files come from different releases or snapshots. Take both "
                    f"from the same dists/<suite>/main/i18n/ folder (or the same apt-get update).")
            log(f"{common} descriptions have both English and '{lang}' text")
        sub = argparse.Namespace(**{**vars(args), "corpora": pending})
        pairs, counts = build_pairs(sub, en, xx)
        for c in pending:
            splits = dedup_and_guard(c, pairs[c], counts[c])
            stats = corpus_stats(c, lang, splits, counts[c])
            if c == "deen" and sum(len(v) for v in splits.values()) == 0:
                raise CorpusError(f"no {lang}-en pairs survived alignment and filtering")
            sx, tx = corpus_files(c, lang)

            def build(tmp: Path, splits=splits, stats=stats, sx=sx, tx=tx):
                for split in SPLITS:
                    write_lines(tmp / f"{split}.{sx}", (it[0] for it in splits[split]))
                    if tx:
                        write_lines(tmp / f"{split}.{tx}", (it[1] for it in splits[split]))
                (tmp / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
                (tmp / "stats.txt").write_text(format_stats(stats, lang) + "\n")

            run_step(dirs[c] / "raw", raw_keys[c], args.force, f"raw {corpus_dirname(c, lang)}", build)
    for c in args.corpora:
        if c not in pending:
            log(f"raw {corpus_dirname(c, lang)}: up to date in {dirs[c] / 'raw'} (skipped; --force rebuilds)")
        all_stats[c] = json.loads((dirs[c] / "raw" / "stats.json").read_text())

    report = "\n\n".join(format_stats(all_stats[c], lang) for c in args.corpora)
    print(report, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp_stats = out / f".stats.txt.tmp-{os.getpid()}"
    tmp_stats.write_text(report + "\n")
    tmp_stats.replace(out / "stats.txt")

    if args.spm:
        for c in args.corpora:
            raw = dirs[c] / "raw"
            raw_key = json.loads((raw / ".done").read_text())["key"]
            spm_key = _digest({"raw": raw_key, "vocab": args.vocab_size, "type": args.spm_type,
                               "cov": args.character_coverage, "n": args.spm_sentences})
            run_step(dirs[c] / "spm", spm_key, args.force, f"spm {corpus_dirname(c, lang)}",
                     lambda tmp, raw=raw, c=c: train_and_encode_spm(raw, tmp, c, lang, args))
            if args.binarize:
                bin_key = _digest({"spm": spm_key, "joined": args.joined_dictionary})
                run_step(dirs[c] / "data-bin", bin_key, args.force,
                         f"data-bin {corpus_dirname(c, lang)}",
                         lambda tmp, c=c: binarize(dirs[c] / "spm", tmp, c, lang, args))
    if args.sample:
        write_sample(out, Path(args.sample), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
