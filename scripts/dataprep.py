#!/usr/bin/env python3
"""Shared logic of the public-dataset preparation scripts (``scripts/prepare-*.sh``).

Usage (the shell scripts are thin wrappers around this)::

    python scripts/dataprep.py DATASET [options]      DATASET: one of DATASETS below
    python scripts/dataprep.py DATASET --help         options of one dataset
    python scripts/dataprep.py checksums              the checksum table

Every run goes through the same stages:

1. *fetch*: each archive of the dataset comes from ``--archive PATH`` (or the
   ``GRNN_ARCHIVES`` environment variable), else from the download cache
   (``--cache-dir``, default ``$GRNN_DATA_CACHE`` or ``work/downloads``), else it is
   downloaded there.  Its sha256 (and md5, where a maintained registry publishes one)
   is checked against ``ARCHIVES`` below, the single checksum table; a mismatch is a
   hard error.  Archives with no checksum at all are refused unless ``--no-verify`` (or
   ``--checksum NAME=SHA256``) is given.
2. *extract*: only the needed members, found by their path in the archive.
3. dataset specific text steps (cleaning, splitting), *spm* (sentencepiece training)
   and *encode* for the subword datasets.
4. *fairseq-preprocess* into ``--destdir`` (default ``data-bin/<name>``).

Each step writes into a temporary folder that is renamed into place, followed by a
``<step>.done`` marker holding a fingerprint of every option the step depends on.  A
rerun skips the steps whose marker matches (and everything when the data-bin is
already complete); a changed option redoes that step and the later ones; ``--force``
redoes everything.  The data-bin itself is built in ``.<name>.partial`` next to it and
renamed at the end, with ``.prepare-done.json`` inside, so an interrupted run never
leaves a half-written data-bin that a later run could take for finished.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import unicodedata
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

PIPELINE_VERSION = 1  # bump when an output changes for the same options
DONE_NAME = ".prepare-done.json"
SPLITS = ("train", "valid", "test")


class PrepError(Exception):
    """A problem the user can fix; reported as a message, without a traceback."""


# ======================================================================================
# The checksum table: every archive any script downloads, in ONE place.
#
#   sha256=None   -> TO BE VERIFIED: we could not learn the true sum offline.  Such a
#                    file is refused unless the user passes --no-verify (or pins the sum
#                    with --checksum NAME=SHA256); the error prints the actual sum so it
#                    can be recorded here after checking it against a trusted copy.
#   sha256="..."  -> enforced.  `pinned_from` says where the value comes from; none of
#                    the values was re-computed by us from a real download (this project
#                    is developed without internet access).
#   md5="..."     -> enforced too (alone where no sha256 is known, or as a second,
#                    independent check); `md5_from` names the registry it comes from.
# ======================================================================================


@dataclass(frozen=True)
class Archive:
    name: str                 # file name in the download cache
    urls: tuple               # tried in order
    sha256: str | None        # None = to be verified
    size: int | None          # bytes, when known (quick check for truncated files)
    pinned_from: str          # provenance of sha256/size
    manual: str = ""          # extra advice for getting the file by hand
    md5: str | None = None    # a published md5, enforced as well
    md5_from: str = ""        # provenance of md5


def _sacrebleu(name: str) -> str:
    return (f"sacrebleu's test-set registry (sacrebleu.dataset.DATASETS[{name!r}], "
            "which verifies it on every download)")


_TFDS = "tensorflow/datasets url_checksums (published there, not re-verified here)"

ARCHIVES: dict[str, Archive] = {a.name: a for a in (
    Archive("de-en.tgz",
            ("http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz",
             "https://wit3.fbk.eu/archive/2014-01/texts/de/en/de-en.tgz"),
            None, None, "TO BE VERIFIED",
            "the IWSLT 2014 (2014-01) TED release from WIT3; the fairseq mirror is the "
            "one fairseq's examples/translation/prepare-iwslt14.sh uses"),
    Archive("training-parallel-europarl-v7.tgz",
            ("http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz",),
            "0224c7c710c8a063dfd893b0cc0830202d61f4c75c17eb8e31836103d27d96e7", 657632379,
            _TFDS),
    Archive("training-parallel-commoncrawl.tgz",
            ("http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz",),
            "c7a74e2ea01ac6c920123108627e35278d4ccb5701e15428ffa34de86fa3a9e5", 918311367,
            _TFDS),
    Archive("training-parallel-nc-v9.tgz",
            ("http://www.statmt.org/wmt14/training-parallel-nc-v9.tgz",),
            "cb8953f292298e6877ae433c98912b927cb0766b303f4540512ddd286c748485", 80418416,
            _TFDS),
    Archive("dev.tgz",
            ("http://data.statmt.org/wmt19/translation-task/dev.tgz",),
            "7a7deccf82ebb05ba508dba5eb21356492224e8f630ec4f992132b029b4b25e7", 38654961,
            _TFDS, "the WMT19 dev archive (holds newstest2013 with all earlier test sets)",
            md5="f2ec7af5947c19e0cacb3882eb208002", md5_from=_sacrebleu("wmt19/dev")),
    Archive("test-full.tgz",
            ("http://www.statmt.org/wmt14/test-full.tgz",),
            None, None, "TO BE VERIFIED",
            "the full (3003 sentence) newstest2014, not test-filtered.tgz",
            md5="a8cd784e006feb32ac6f3d9ec7eb389a", md5_from=_sacrebleu("wmt14/full")),
    Archive("summary.tar.gz",
            ("https://drive.usercontent.google.com/download?id=0B6N7tANPyVeBNmlSX19Ld2xDU1E"
             "&export=download&confirm=t",
             "https://drive.google.com/uc?export=download&id=0B6N7tANPyVeBNmlSX19Ld2xDU1E"),
            "ffa257f32de233bfc832e9e5e3910cb72f4023b37a86af8fee87b344baeb8a4a", 290866023,
            _TFDS,
            "the 'sumdata' archive of Rush et al. 2015 linked from "
            "https://github.com/harvardnlp/sent-summary (Google Drive id "
            "0B6N7tANPyVeBNmlSX19Ld2xDU1E); Google Drive may answer with a confirmation "
            "page instead of the file -- then download it in a browser"),
    Archive("simple-examples.tgz",
            ("http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",),
            None, None, "TO BE VERIFIED", "Tomas Mikolov's RNNLM toolkit examples (PTB)",
            md5="30177ea32e27c525793142b6bf2c8e2d",
            md5_from="PaddlePaddle's PTB loaders (paddle.dataset.imikolov / "
                     "paddle.text.datasets.Imikolov), which verify it on every download"),
    Archive("wikitext-2-v1.zip",
            ("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
             "https://wikitext.smerity.com/wikitext-2-v1.zip"),
            "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c", None,
            "a public Julia DataDeps registration of this URL (published there, "
            "not re-verified here)"),
)}


# ======================================================================================
# small utilities
# ======================================================================================

def log(msg: str) -> None:
    print(f"[dataprep] {msg}", file=sys.stderr, flush=True)


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def sha256_file(path: Path) -> str:
    return file_digests(path)[0]


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) of a file, read once."""
    h, m = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            m.update(block)
    return h.hexdigest(), m.hexdigest()


def normalize_ws(text: str) -> str:
    """Collapse every run of whitespace (incl. \\r, NBSP, U+2028) to one space."""
    return " ".join(text.split())


def remove_nonprinting(text: str) -> str:
    """Like Moses' remove-non-printing-char.perl: control/format characters -> space."""
    return "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)


def read_lines(path: Path) -> Iterator[str]:
    """Lines without their end of line; only \\n ends a line (a stray \\r or U+2028
    inside a line does not split it)."""
    with open(path, encoding="utf-8", errors="replace", newline="\n") as fh:
        for line in fh:
            yield line.rstrip("\n").rstrip("\r")


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


class LineWriter:
    def __init__(self, path: Path):
        self.fh = open(path, "w", encoding="utf-8", newline="\n")
        self.n = 0

    def write(self, line: str) -> None:
        self.fh.write(line)
        self.fh.write("\n")
        self.n += 1

    def close(self) -> None:
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def zip_parallel(path_a: Path, path_b: Path) -> Iterator[tuple[str, str]]:
    """Pairs of lines of two parallel files; different lengths are a hard error."""
    it_a, it_b = read_lines(path_a), read_lines(path_b)
    n = 0
    sentinel = object()
    while True:
        a, b = next(it_a, sentinel), next(it_b, sentinel)
        if a is sentinel and b is sentinel:
            return
        if a is sentinel or b is sentinel:
            longer = path_b if a is sentinel else path_a
            raise PrepError(f"parallel files differ in length: {path_a.name} and {path_b.name} "
                            f"agree on {n} lines, then {longer.name} goes on. The archive is "
                            "damaged or not the expected release.")
        n += 1
        yield a, b


def length_ratio_ok(n_a: int, n_b: int, min_len: int, max_len: int, ratio: float) -> bool:
    """The rule of Moses' clean-corpus-n.perl: both lengths in [min_len, max_len] and
    neither side more than `ratio` times longer than the other."""
    if n_a < min_len or n_b < min_len or n_a > max_len or n_b > max_len:
        return False
    if n_a == 0 or n_b == 0:
        return False
    return n_a / n_b <= ratio and n_b / n_a <= ratio


_SEG = re.compile(r'<seg id="?\s*\d+\s*"?\s*>\s*(.*?)\s*</seg>', re.IGNORECASE)


def read_seg_file(path: Path) -> list[str]:
    """The text of each ``<seg id="N">...</seg>`` line of an IWSLT .xml or WMT .sgm file
    (the recipes' ``grep '<seg id'`` + tag removal), with XML entities decoded and
    the typographic apostrophe ’ mapped to ' as in fairseq's recipes."""
    out = []
    for line in read_lines(path):
        if "<seg id" not in line.lower():
            continue
        m = _SEG.search(line)
        text = m.group(1) if m else re.sub(r"<[^>]*>", " ", line)
        text = html.unescape(text).replace("\u2019", "'")
        out.append(normalize_ws(text))
    if not out:
        raise PrepError(f"{path.name} holds no <seg id=...> lines: not an IWSLT/WMT "
                        "evaluation file?")
    return out


class MosesTok:
    """Optional Moses tokenization (sacremoses), as fairseq's recipes tokenize before
    their length filter."""

    def __init__(self, lang: str, aggressive: bool = False, normalize: bool = False):
        try:
            import sacremoses
        except ImportError:
            raise PrepError("--moses needs the sacremoses module: pip install sacremoses") from None
        self.tok = sacremoses.MosesTokenizer(lang=lang)
        self.norm = sacremoses.MosesPunctNormalizer(lang=lang) if normalize else None
        self.aggressive = aggressive

    def __call__(self, text: str) -> str:
        if self.norm is not None:
            text = self.norm.normalize(text)
        return normalize_ws(self.tok.tokenize(text, return_str=True, escape=False,
                                              aggressive_dash_splits=self.aggressive))


# ======================================================================================
# fetching and checking archives
# ======================================================================================

class Fetcher:
    """Finds (local archive / cache) or downloads an archive and verifies it."""

    def __init__(self, opts):
        self.cache = Path(opts.cache_dir)
        self.no_verify = opts.no_verify
        self.overrides = {}
        for item in opts.checksum or []:
            name, _, value = item.partition("=")
            value = value.strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", value):
                raise PrepError(f"--checksum {item}: expected NAME=<64 hex digits of sha256>")
            self.overrides[name.strip()] = value
        self.urls = {}
        for item in opts.url or []:
            name, _, value = item.partition("=")
            if not value:
                raise PrepError(f"--url {item}: expected NAME=URL")
            self.urls[name.strip()] = value.strip()
        self.local: dict[str, Path] = {}
        self.local_dirs: list[Path] = []
        self.wanted: list[str] = list(opts.archives_of_dataset)
        self.entries = list(opts.archive or [])
        env = os.environ.get("GRNN_ARCHIVES", "")
        self.entries += [e for e in env.split(os.pathsep) if e]
        self.parsed = False  # local archives are looked at only when an archive is needed

    def _parse_local(self) -> None:
        if not self.parsed:
            for entry in self.entries:
                self._add_local(entry)
            self.parsed = True

    def _add_local(self, entry: str) -> None:
        name, sep, path = entry.partition("=")
        if sep and name in ARCHIVES:
            p = Path(path).expanduser()
            if not p.is_file():
                raise PrepError(f"--archive {entry}: no such file {p}")
            self.local[name] = p
            return
        p = Path(entry).expanduser()
        if p.is_dir():
            self.local_dirs.append(p)
            return
        if not p.is_file():
            raise PrepError(f"--archive {entry}: no such file or folder")
        if p.name in self.wanted:
            self.local[p.name] = p
        elif len(self.wanted) == 1:
            self.local[self.wanted[0]] = p
        else:
            raise PrepError(f"--archive {p}: cannot tell which archive this is; this dataset "
                            f"needs {', '.join(self.wanted)}. Name the file like that, pass "
                            "a folder holding them, or write --archive NAME=PATH.")

    def get(self, name: str) -> Path:
        self._parse_local()
        arch = ARCHIVES[name]
        local = True
        if name in self.local:
            path = self.local[name]
            log(f"{name}: using local archive {path}")
        else:
            found = [d / name for d in self.local_dirs if (d / name).is_file()]
            if found:
                path = found[0]
                log(f"{name}: using local archive {path}")
            else:
                local = False
                path = self.cache / name
                if path.is_file():
                    log(f"{name}: found in the download cache {path}")
                else:
                    self.download(arch, path)
        self.verify(arch, path, local)
        return path

    def download(self, arch: Archive, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        urls = [self.urls[arch.name]] if arch.name in self.urls else list(arch.urls)
        part = dest.with_name(dest.name + ".part")
        errors = []
        for url in urls:
            log(f"{arch.name}: downloading {url}")
            try:
                self._download_one(url, part)
            except (OSError, urllib.error.URLError, ValueError, PrepError) as e:
                errors.append(f"{url}: {e}")
                part.unlink(missing_ok=True)
                continue
            os.replace(part, dest)
            return
        raise PrepError(
            f"could not download {arch.name}:\n  " + "\n  ".join(errors) + "\n"
            f"Without internet access: fetch it on another machine from {arch.urls[0]}"
            + (f" ({arch.manual})" if arch.manual else "")
            + f", then pass it with --archive PATH (or put it at {dest}).")

    @staticmethod
    def _download_one(url: str, part: Path) -> None:
        req = urllib.request.Request(url, headers={"User-Agent": "grnn-fairseq-dataprep/1"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            ctype = resp.headers.get("Content-Type", "") or ""
            if "text/html" in ctype.lower():
                raise PrepError("the server sent an HTML page instead of the archive "
                                "(a confirmation or error page)")
            expected = resp.headers.get("Content-Length")
            got, last = 0, time.time()
            with open(part, "wb") as out:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    got += len(block)
                    if time.time() - last > 10:
                        last = time.time()
                        total = f" of {int(expected) / 1e6:.1f}" if expected else ""
                        log(f"  {got / 1e6:.1f}{total} MB")
        if expected is not None and got != int(expected):
            raise PrepError(f"download truncated: got {got} of {expected} bytes")

    def verify(self, arch: Archive, path: Path, local: bool = False) -> None:
        if self.no_verify:
            log(f"{arch.name}: checksum NOT verified (--no-verify)")
            return
        expected = self.overrides.get(arch.name, arch.sha256)
        size = path.stat().st_size
        source = (f"get it from {arch.urls[0]}" + (f"; {arch.manual}" if arch.manual else ""))
        if local:
            fix = (f"Fix: {path} was given as a local archive (--archive / GRNN_ARCHIVES); "
                   f"replace it with a good copy ({source}).")
        else:
            fix = (f"Fix: delete the cached file {path} so that the next run downloads it "
                   f"again, or pass a good copy with --archive PATH ({source}).")
        if arch.name not in self.overrides and arch.size is not None and size != arch.size:
            raise PrepError(
                f"checksum mismatch for {arch.name} ({path}): expected {arch.size} bytes "
                f"and sha256 {arch.sha256}, found {size} bytes (truncated or a different "
                f"file). {fix}")
        log(f"{arch.name}: computing sha256 of {size / 1e6:.1f} MB ...")
        actual, actual_md5 = file_digests(path)
        if arch.name not in self.overrides and arch.md5 is not None:
            if actual_md5 != arch.md5:
                raise PrepError(
                    f"checksum mismatch for {arch.name} ({path}): expected md5 {arch.md5} "
                    f"(published by {arch.md5_from}), got {actual_md5}. The file is corrupt, "
                    "truncated or not the expected release. " + fix
                    + " Use --no-verify only if you know the file is right.")
            if expected is None:
                log(f"{arch.name}: md5 OK ({arch.md5}); its sha256 is {actual} "
                    "(not pinned in ARCHIVES yet)")
                return
        if expected is None:
            raise PrepError(
                f"no sha256 is pinned for {arch.name}: its entry in the ARCHIVES table of "
                f"scripts/dataprep.py is marked TO BE VERIFIED. The file {path} has sha256 "
                f"{actual}. If you trust it (e.g. it matches a copy from "
                f"{arch.urls[0]}), rerun with --no-verify, or pin the sum with "
                f"--checksum {arch.name}={actual} (and record it in ARCHIVES).")
        if actual != expected:
            raise PrepError(
                f"checksum mismatch for {arch.name} ({path}): expected sha256 {expected}, "
                f"got {actual}. The file is corrupt, truncated or not the expected release. "
                + fix + " Use --no-verify only if you know the file is right.")
        log(f"{arch.name}: sha256 OK")


def _member_matches(member: str, candidate: str) -> bool:
    while member.startswith("./"):
        member = member[2:]
    member = member.lstrip("/")
    return member == candidate or member.endswith("/" + candidate)


def extract_members(archive: Path, arch_name: str, wanted: dict[str, tuple],
                    dest: Path) -> None:
    """Copy the members named in `wanted` (output file -> candidate paths inside the
    archive, matched as a path suffix; a candidate ending in .gz is gunzipped) to
    `dest`, without extracting anything else and without trusting member paths."""
    todo = dict(wanted)
    seen: list[str] = []

    def take(member_name: str, opener) -> None:
        for out_name, candidates in list(todo.items()):
            for cand in candidates:
                if _member_matches(member_name, cand):
                    with opener() as src, open(dest / out_name, "wb") as out:
                        stream = gzip.GzipFile(fileobj=src) if cand.endswith(".gz") else src
                        shutil.copyfileobj(stream, out, 1 << 20)
                    del todo[out_name]
                    return

    hint = (f"If it is in the download cache, delete it so that the next run downloads it "
            f"again; otherwise pass a good copy with --archive PATH (from "
            f"{ARCHIVES[arch_name].urls[0]}).")
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    seen.append(info.filename)
                    if not info.is_dir():
                        take(info.filename, lambda info=info: zf.open(info))
                    if not todo:
                        break
        else:
            with tarfile.open(archive, "r:*") as tf:
                for member in tf:
                    seen.append(member.name)
                    if member.isfile():
                        take(member.name, lambda m=member: tf.extractfile(m))
                    if not todo:
                        break
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile,
            OSError) as e:
        raise PrepError(f"cannot read {arch_name} ({archive}): the archive is truncated or "
                        f"corrupt ({type(e).__name__}: {e}). {hint}") from None
    if todo:
        missing = [c[0] for c in todo.values()]
        sample = ", ".join(seen[:8]) + (" ..." if len(seen) > 8 else "")
        raise PrepError(f"{arch_name} ({archive}) does not contain {', '.join(missing)} "
                        f"(it holds {len(seen)} entries: {sample or 'none'}). This is not the "
                        f"expected archive. {hint}")


# ======================================================================================
# steps with done markers, atomic outputs
# ======================================================================================

@dataclass
class Step:
    name: str
    params: dict
    run: Callable[[Path], dict | None]   # writes into the given folder, returns stats


class Runner:
    def __init__(self, dataset: str, opts, steps: list[Step], preprocess: Step):
        self.dataset = dataset
        self.opts = opts
        self.work = Path(opts.work_dir)
        self.destdir = Path(opts.destdir)
        self.steps = steps
        self.preprocess = preprocess
        fp = fingerprint({"dataset": dataset, "version": PIPELINE_VERSION})
        self.fps = {}
        for step in steps + [preprocess]:
            fp = fingerprint({"prev": fp, "step": step.name, "params": step.params})
            self.fps[step.name] = fp
        self.final_fp = fp

    def out(self, step_name: str) -> Path:
        return self.work / step_name

    def _marker(self, name: str) -> Path:
        return self.work / f"{name}.done"

    def _done(self, name: str) -> bool:
        marker = self._marker(name)
        if self.opts.force or not marker.is_file() or not self.out(name).is_dir():
            return False
        try:
            return json.loads(marker.read_text())["fingerprint"] == self.fps[name]
        except (ValueError, KeyError, OSError):
            return False

    def _clean_leftovers(self) -> None:
        for p in list(self.work.glob("*.partial")) + list(self.work.glob("*.old")):
            shutil.rmtree(p, ignore_errors=True)
        for suffix in (".partial", ".old"):
            p = self.destdir.parent / f".{self.destdir.name}{suffix}"
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)

    def databin_done(self) -> bool:
        marker = self.destdir / DONE_NAME
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text())["fingerprint"] == self.final_fp
        except (ValueError, KeyError, OSError):
            return False

    def run(self) -> int:
        if self.databin_done() and not self.opts.force:
            log(f"{self.destdir} is already prepared with these options; nothing to do "
                "(--force redoes everything)")
            return 0
        if self.destdir.exists() and not (self.destdir / DONE_NAME).is_file() \
                and not self.opts.force:
            raise PrepError(f"{self.destdir} exists but was not completed by this script "
                            "(no .prepare-done.json inside). Remove it, choose another "
                            "--destdir, or pass --force to replace it.")
        if (self.destdir / DONE_NAME).is_file() and not self.opts.force:
            log(f"{self.destdir} was prepared with other options; rebuilding it")
        self.work.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()
        t_all = time.time()
        for step in self.steps:
            if self._done(step.name):
                log(f"step {step.name}: already done, skipped")
                continue
            self._run_step(step)
        self._build_databin()
        log(f"done in {time.time() - t_all:.1f}s: {self.destdir}")
        if self.opts.rm_work:
            shutil.rmtree(self.work, ignore_errors=True)
            log(f"removed the work folder {self.work} (--rm-work)")
        return 0

    def _run_step(self, step: Step) -> None:
        log(f"step {step.name}: running")
        t0 = time.time()
        final, marker = self.out(step.name), self._marker(step.name)
        tmp = self.work / f"{step.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        marker.unlink(missing_ok=True)
        tmp.mkdir(parents=True)
        try:
            stats = step.run(tmp) or {}
            with open(tmp / "stats.json", "w") as fh:
                json.dump(stats, fh, indent=1, sort_keys=True)
            if final.exists():
                old = self.work / f"{step.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        marker_tmp = marker.with_name(marker.name + ".tmp")
        marker_tmp.write_text(json.dumps({"fingerprint": self.fps[step.name], "step": step.name,
                                          "params": step.params,
                                          "finished": time.strftime("%Y-%m-%d %H:%M:%S")},
                                         default=str) + "\n")
        os.replace(marker_tmp, marker)
        log(f"step {step.name}: done in {time.time() - t0:.1f}s")

    def _build_databin(self) -> None:
        dest = self.destdir
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.parent / f".{dest.name}.partial"
        old = dest.parent / f".{dest.name}.old"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        log(f"step {self.preprocess.name}: running")
        try:
            stats = self.preprocess.run(partial) or {}
            stats.update(self.collect_stats())
            info = {"fingerprint": self.final_fp, "dataset": self.dataset,
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "options": {s.name: s.params for s in self.steps + [self.preprocess]},
                    "stats": stats}
            with open(partial / DONE_NAME, "w") as fh:
                json.dump(info, fh, indent=1, sort_keys=True, default=str)
            if dest.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.rename(dest, old)
            os.rename(partial, dest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        for key, value in sorted(stats.items()):
            log(f"  {key}: {value}")

    def collect_stats(self) -> dict:
        stats = {}
        for step in self.steps:
            p = self.out(step.name) / "stats.json"
            if p.is_file():
                try:
                    stats.update(json.loads(p.read_text()))
                except ValueError:
                    pass
        return stats


# ======================================================================================
# sentencepiece and fairseq-preprocess
# ======================================================================================

def spm_train(inputs: list[Path], out: Path, opts, user_symbols=(), unk_piece="<unk>") -> dict:
    """Train a sentencepiece model (out/spm.model) on the lines of `inputs`; when they
    hold more than --spm-sample lines, every k-th line is used (deterministic)."""
    import sentencepiece as spm

    total = sum(count_lines(p) for p in inputs)
    if total == 0:
        raise PrepError("the training data is empty; cannot train sentencepiece")
    files = [str(p) for p in inputs]
    if opts.spm_sample and total > opts.spm_sample:
        stride = -(-total // opts.spm_sample)
        sample = out / "spm-sample.txt"
        with LineWriter(sample) as w:
            i = 0
            for p in inputs:
                for line in read_lines(p):
                    if i % stride == 0:
                        w.write(line)
                    i += 1
        files = [str(sample)]
        log(f"sentencepiece: training on every {stride}-th of {total} lines")
    kwargs = dict(user_defined_symbols=list(user_symbols)) if user_symbols else {}
    spm.SentencePieceTrainer.train(
        input=",".join(files), model_prefix=str(out / "spm"), vocab_size=opts.vocab_size,
        model_type=opts.spm_type, character_coverage=1.0, input_sentence_size=0,
        bos_id=-1, eos_id=-1, unk_piece=unk_piece, hard_vocab_limit=False,
        num_threads=max(1, opts.workers), minloglevel=2, **kwargs)
    (out / "spm-sample.txt").unlink(missing_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    return {"spm_pieces": sp.get_piece_size()}


def spm_encoder(model: Path, workers: int) -> Callable[[list[str]], list[str]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))

    def encode(lines: list[str]) -> list[str]:
        if not lines:
            return []
        pieces = sp.encode(lines, out_type=str, num_threads=max(1, workers))
        return [" ".join(p) for p in pieces]
    return encode


def batched(it: Iterable, n: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_file(encode, src: Path, dst: Path) -> int:
    with LineWriter(dst) as w:
        for batch in batched(read_lines(src), 20000):
            for line in encode(batch):
                w.write(line)
        return w.n


def preprocess_command(opts) -> list[str]:
    if opts.fairseq_preprocess:
        return shlex.split(opts.fairseq_preprocess)
    import importlib.util
    if importlib.util.find_spec("fairseq_cli") is not None:
        return [sys.executable, "-m", "fairseq_cli.preprocess"]
    exe = shutil.which("fairseq-preprocess")
    if exe:
        return [exe]
    raise PrepError(f"fairseq is not installed for {sys.executable} and fairseq-preprocess is "
                    "not on PATH: pip install fairseq-fixed (or set PYTHON to the python of "
                    "an environment that has fairseq)")


def run_preprocess(opts, args: list[str], destdir: Path) -> None:
    cmd = preprocess_command(opts) + args + ["--destdir", str(destdir),
                                             "--workers", str(max(1, opts.workers))]
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        raise PrepError(f"fairseq-preprocess failed (exit {proc.returncode}); no data-bin was "
                        f"written. Its last output:\n{tail}")


# ======================================================================================
# datasets
# ======================================================================================

def mt_pipeline(dataset: str, opts, extract: Step, text: Step, src: str, tgt: str,
                clean_after_bpe: dict | None, joined: bool,
                user_symbols=(), unk_piece="<unk>") -> Runner:
    """extract -> text -> spm -> encode -> fairseq-preprocess for a parallel corpus; the
    text step writes {train,valid,test}.{src,tgt}."""
    runner: Runner

    def spm_step(out: Path):
        t = runner.out("text")
        return spm_train([t / f"train.{src}", t / f"train.{tgt}"], out, opts,
                         user_symbols, unk_piece)

    def encode_step(out: Path):
        t, model = runner.out("text"), runner.out("spm") / "spm.model"
        encode = spm_encoder(model, opts.workers)
        stats = {}
        for split in SPLITS:
            if split == "train" and clean_after_bpe:
                c = clean_after_bpe
                kept = dropped = 0
                with LineWriter(out / f"train.{src}") as ws, LineWriter(out / f"train.{tgt}") as wt:
                    pairs = zip_parallel(t / f"train.{src}", t / f"train.{tgt}")
                    for batch in batched(pairs, 20000):
                        es = encode([a for a, _ in batch])
                        et = encode([b for _, b in batch])
                        for a, b in zip(es, et):
                            if length_ratio_ok(len(a.split()), len(b.split()),
                                               c["min_len"], c["max_len"], c["ratio"]):
                                ws.write(a)
                                wt.write(b)
                                kept += 1
                            else:
                                dropped += 1
                stats.update({"train_pairs": kept, "train_dropped_after_bpe": dropped})
                continue
            n = encode_file(encode, t / f"{split}.{src}", out / f"{split}.{src}")
            m = encode_file(encode, t / f"{split}.{tgt}", out / f"{split}.{tgt}")
            if n != m:
                raise PrepError(f"{split}: {n} {src} lines but {m} {tgt} lines")
            stats[f"{split}_pairs"] = n
        shutil.copy(model, out / "spm.model")
        return stats

    def preprocess_step(out: Path):
        e = runner.out("encode")
        args = ["--source-lang", src, "--target-lang", tgt,
                "--trainpref", str(e / "train"), "--validpref", str(e / "valid"),
                "--testpref", str(e / "test"), "--thresholdsrc", "0", "--thresholdtgt", "0"]
        if joined:
            args.append("--joined-dictionary")
        run_preprocess(opts, args, out)
        for f in ("spm.model", "spm.vocab"):
            shutil.copy(runner.out("spm") / f, out / f)
        return {"joined_dictionary": joined}

    spm_params = {"vocab": opts.vocab_size, "type": opts.spm_type, "sample": opts.spm_sample,
                  "symbols": list(user_symbols), "unk": unk_piece}
    steps = [extract, text,
             Step("spm", spm_params, spm_step),
             Step("encode", {"clean": clean_after_bpe}, encode_step)]
    runner = Runner(dataset, opts, steps,
                    Step("fairseq-preprocess", {"joined": joined, "src": src, "tgt": tgt},
                         preprocess_step))
    return runner


def extract_step(fetcher: Fetcher, members: dict[str, dict[str, tuple]]) -> Step:
    """members: archive name -> {output file: candidate member paths}."""
    def run(out: Path):
        for arch_name, wanted in members.items():
            path = fetcher.get(arch_name)
            log(f"{arch_name}: extracting {len(wanted)} file(s)")
            extract_members(path, arch_name, wanted, out)
        return {}
    return Step("extract", {"members": members}, run)


# ---------------------------------------------------------------------- IWSLT14 De-En

IWSLT_DEV_TEST = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                  "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")  # test = these, in order
IWSLT_DROP_LINES = ("<url>", "<talkid>", "<keywords>")
IWSLT_DROP_TAGS = ("<title>", "</title>", "<description>", "</description>")


def iwslt_train_line(line: str) -> str | None:
    """fairseq's recipe on train.tags.*: drop the <url>, <talkid> and <keywords> lines,
    strip the <title> and <description> tags (keeping their text)."""
    if any(tag in line for tag in IWSLT_DROP_LINES):
        return None
    for tag in IWSLT_DROP_TAGS:
        line = line.replace(tag, "")
    return normalize_ws(line)


def prepare_iwslt14(opts) -> Runner:
    src, tgt, lp = "de", "en", "de-en"
    fetcher = Fetcher(opts)
    wanted = {f"train.tags.{lp}.{l}": (f"{lp}/train.tags.{lp}.{l}",) for l in (src, tgt)}
    for name in IWSLT_DEV_TEST:
        for l in (src, tgt):
            wanted[f"{name}.{lp}.{l}.xml"] = (f"{lp}/{name}.{lp}.{l}.xml",)
    extract = extract_step(fetcher, {"de-en.tgz": wanted})

    def text(out: Path):
        raw = Path(opts.work_dir) / "extract"
        tok = {l: MosesTok(l) for l in (src, tgt)} if opts.moses else None
        sides = {}
        for l in (src, tgt):
            lines = [x for x in map(iwslt_train_line, read_lines(raw / f"train.tags.{lp}.{l}"))
                     if x is not None]
            sides[l] = [tok[l](x) for x in lines] if tok else lines
        if len(sides[src]) != len(sides[tgt]):
            raise PrepError(f"train.tags.{lp}.{src} and .{tgt} differ in length after "
                            f"removing the tag lines ({len(sides[src])} vs "
                            f"{len(sides[tgt])}): damaged or unexpected archive")
        read = len(sides[src])
        with LineWriter(out / f"train.{src}") as ts, LineWriter(out / f"train.{tgt}") as tt, \
                LineWriter(out / f"valid.{src}") as vs, LineWriter(out / f"valid.{tgt}") as vt:
            kept = 0
            for a, b in zip(sides[src], sides[tgt]):
                if not length_ratio_ok(len(a.split()), len(b.split()),
                                       opts.min_len, opts.max_len, opts.ratio):
                    continue
                kept += 1
                if not opts.keep_case:
                    a, b = a.lower(), b.lower()
                if kept % opts.valid_every == 0:     # awk 'NR%23 == 0' on the cleaned corpus
                    vs.write(a)
                    vt.write(b)
                else:
                    ts.write(a)
                    tt.write(b)
        stats = {"train_tags_pairs": read, "cleaned_pairs": kept, "train_pairs_text": ts.n,
                 "valid_pairs_text": vs.n}
        for l in (src, tgt):
            with LineWriter(out / f"test.{l}") as w:
                for name in IWSLT_DEV_TEST:
                    segs = read_seg_file(raw / f"{name}.{lp}.{l}.xml")
                    for s in segs:
                        s = tok[l](s) if tok else s
                        w.write(s if opts.keep_case else s.lower())
                    stats[f"{name}.{l}"] = len(segs)
            stats[f"test_lines.{l}"] = w.n
        if stats[f"test_lines.{src}"] != stats[f"test_lines.{tgt}"]:
            raise PrepError("the IWSLT dev/test files of the two languages have different "
                            f"numbers of segments: {stats}")
        return stats

    text_params = {"min": opts.min_len, "max": opts.max_len, "ratio": opts.ratio,
                   "every": opts.valid_every, "keep_case": opts.keep_case, "moses": opts.moses}
    return mt_pipeline("iwslt14-de-en", opts, extract, Step("text", text_params, text),
                       src, tgt, clean_after_bpe=None, joined=opts.joined_dictionary)


# ---------------------------------------------------------------------- WMT14 En-De

WMT14_TRAIN = (  # archive, member path without the language suffix
    ("training-parallel-europarl-v7.tgz", "training/europarl-v7.de-en"),
    ("training-parallel-commoncrawl.tgz", "commoncrawl.de-en"),
    ("training-parallel-nc-v9.tgz", "training/news-commentary-v9.de-en"),
)


def prepare_wmt14(opts) -> Runner:
    src, tgt = "en", "de"
    fetcher = Fetcher(opts)
    members: dict[str, dict] = {}
    for arch, base in WMT14_TRAIN:
        stem = base.rsplit("/", 1)[-1]
        members[arch] = {f"{stem}.{l}": (f"{base}.{l}",) for l in (src, tgt)}
    members["dev.tgz"] = {"newstest2013.en.sgm": ("dev/newstest2013-src.en.sgm",),
                          "newstest2013.de.sgm": ("dev/newstest2013-ref.de.sgm",)}
    members["test-full.tgz"] = {"newstest2014.en.sgm": ("test-full/newstest2014-deen-src.en.sgm",),
                                "newstest2014.de.sgm": ("test-full/newstest2014-deen-ref.de.sgm",)}
    extract = extract_step(fetcher, members)

    def text(out: Path):
        raw = Path(opts.work_dir) / "extract"
        tok = ({l: MosesTok(l, aggressive=True, normalize=True) for l in (src, tgt)}
               if opts.moses else None)

        def clean(line: str, l: str) -> str:
            line = normalize_ws(remove_nonprinting(line))
            return tok[l](line) if tok else line

        stats = {}
        with LineWriter(out / f"train.{src}") as ws, LineWriter(out / f"train.{tgt}") as wt:
            for _, base in WMT14_TRAIN:
                stem = base.rsplit("/", 1)[-1]
                n = dropped = 0
                for a, b in zip_parallel(raw / f"{stem}.{src}", raw / f"{stem}.{tgt}"):
                    a, b = clean(a, src), clean(b, tgt)
                    n += 1
                    if not a or not b:
                        dropped += 1
                        continue
                    ws.write(a)
                    wt.write(b)
                stats[f"{stem}_pairs"] = n
                stats[f"{stem}_empty_dropped"] = dropped
        for split, name in (("valid", "newstest2013"), ("test", "newstest2014")):
            seg = {l: read_seg_file(raw / f"{name}.{l}.sgm") for l in (src, tgt)}
            if len(seg[src]) != len(seg[tgt]):
                raise PrepError(f"{name}: {len(seg[src])} {src} segments but "
                                f"{len(seg[tgt])} {tgt} segments")
            for l in (src, tgt):
                with LineWriter(out / f"{split}.{l}") as w:
                    for s in seg[l]:
                        w.write(clean(s, l))
            stats[f"{name}_pairs"] = len(seg[src])
        return stats

    clean_after = {"min_len": 1, "max_len": opts.max_len, "ratio": opts.ratio}
    return mt_pipeline("wmt14-en-de", opts, extract, Step("text", {"moses": opts.moses}, text),
                       src, tgt, clean_after_bpe=clean_after, joined=opts.joined_dictionary)


# ---------------------------------------------------------------------- Gigaword

_UNK_TOKEN = re.compile(r"(?<!\S)(?:UNK|<unk>)(?!\S)")


def prepare_gigaword(opts) -> Runner:
    src, tgt = "src", "tgt"
    fetcher = Fetcher(opts)
    wanted = {
        "train.article.txt": ("sumdata/train/train.article.txt.gz",
                              "sumdata/train/train.article.txt"),
        "train.title.txt": ("sumdata/train/train.title.txt.gz",
                            "sumdata/train/train.title.txt"),
        "valid.article.txt": ("sumdata/train/valid.article.filter.txt",),
        "valid.title.txt": ("sumdata/train/valid.title.filter.txt",),
        "test.article.txt": ("sumdata/Giga/input.txt",),
        "test.title.txt": ("sumdata/Giga/task1_ref0.txt",),
    }
    extract = extract_step(fetcher, {"summary.tar.gz": wanted})
    map_unk = opts.unk == "map"

    def fix(line: str) -> str:
        line = normalize_ws(line)
        return _UNK_TOKEN.sub("<unk>", line) if map_unk else line

    def text(out: Path):
        raw = Path(opts.work_dir) / "extract"
        stats = {}
        for split in SPLITS:
            n = dropped = unk = 0
            with LineWriter(out / f"{split}.{src}") as ws, LineWriter(out / f"{split}.{tgt}") as wt:
                for a, b in zip_parallel(raw / f"{split}.article.txt", raw / f"{split}.title.txt"):
                    a, b = fix(a), fix(b)
                    n += 1
                    # training pairs with an empty side teach nothing; valid/test are kept whole
                    if split == "train" and (not a or not b):
                        dropped += 1
                        continue
                    if map_unk:
                        unk += a.split().count("<unk>") + b.split().count("<unk>")
                    ws.write(a)
                    wt.write(b)
            stats[f"{split}_pairs_read"] = n
            if split == "train":
                stats["train_empty_dropped"] = dropped
            if map_unk:
                stats[f"{split}_unk_tokens"] = unk
        return stats

    # with --unk map, "<unk>" is kept whole by sentencepiece (user-defined symbol) and then
    # read by fairseq as its own unknown-word symbol
    symbols = ("<unk>",) if map_unk else ()
    return mt_pipeline("gigaword", opts, extract, Step("text", {"unk": opts.unk}, text),
                       src, tgt, clean_after_bpe=None, joined=opts.joined_dictionary,
                       user_symbols=symbols, unk_piece="<spm_unk>" if map_unk else "<unk>")


# ---------------------------------------------------------------------- word-level LMs

# token counts (words + one end of sentence per line) of the official releases; a
# different count only gives a warning
LM_EXPECTED = {
    "ptb": {"types": 10000, "train": 929589, "valid": 73760, "test": 82430},
    "wikitext-2": {"types": 33278, "train": 2088628, "valid": 217646, "test": 245569},
}


def lm_pipeline(dataset: str, opts, arch_name: str, files: dict[str, tuple]) -> Runner:
    fetcher = Fetcher(opts)
    extract = extract_step(fetcher, {arch_name: files})
    runner: Runner

    def preprocess_step(out: Path):
        raw = runner.out("extract")
        stats, vocab = {}, set()
        for split in SPLITS:
            tokens = 0
            for line in read_lines(raw / f"{split}.txt"):
                words = line.split()
                tokens += len(words) + 1
                if split == "train":
                    vocab.update(words)
                else:
                    oov = sum(w not in vocab for w in words)
                    stats[f"{split}_oov_tokens"] = stats.get(f"{split}_oov_tokens", 0) + oov
            stats[f"{split}_tokens"] = tokens
        stats["vocab_types_incl_eos"] = len(vocab | {"<unk>"}) + 1
        exp = LM_EXPECTED[dataset]
        for key, ours in (("types", stats["vocab_types_incl_eos"]),
                          ("train", stats["train_tokens"]), ("valid", stats["valid_tokens"]),
                          ("test", stats["test_tokens"])):
            if ours != exp[key]:
                log(f"warning: {key} = {ours}, the official {dataset} release has {exp[key]} "
                    "(expected only for the real data)")
        args = ["--only-source", "--trainpref", str(raw / "train.txt"),
                "--validpref", str(raw / "valid.txt"), "--testpref", str(raw / "test.txt"),
                "--thresholdsrc", "0", "--padding-factor", "1",
                "--nwordssrc", str(opts.vocab_size)]
        run_preprocess(opts, args, out)
        return stats

    runner = Runner(dataset, opts, [extract],
                    Step("fairseq-preprocess", {"nwords": opts.vocab_size}, preprocess_step))
    return runner


def prepare_ptb(opts) -> Runner:
    return lm_pipeline("ptb", opts, "simple-examples.tgz",
                       {f"{s}.txt": (f"simple-examples/data/ptb.{s}.txt", f"data/ptb.{s}.txt")
                        for s in SPLITS})


def prepare_wikitext2(opts) -> Runner:
    return lm_pipeline("wikitext-2", opts, "wikitext-2-v1.zip",
                       {f"{s}.txt": (f"wikitext-2/wiki.{s}.tokens",) for s in SPLITS})


# ======================================================================================
# command line
# ======================================================================================

DATASETS = {
    # name: (function, archives, default destdir name, description)
    "iwslt14-de-en": (prepare_iwslt14, ["de-en.tgz"], "iwslt14.de-en",
                      "IWSLT14 German-English (fairseq's split and cleaning, sentencepiece)"),
    "wmt14-en-de": (prepare_wmt14, [a for a, _ in WMT14_TRAIN] + ["dev.tgz", "test-full.tgz"],
                    "wmt14.en-de", "WMT14 English-German (newstest2013 valid, newstest2014 test)"),
    "gigaword": (prepare_gigaword, ["summary.tar.gz"], "gigaword",
                 "Gigaword headline generation, split of Rush et al. 2015"),
    "ptb": (prepare_ptb, ["simple-examples.tgz"], "ptb",
            "Penn Treebank, Mikolov's word-level version (10k vocabulary)"),
    "wikitext-2": (prepare_wikitext2, ["wikitext-2-v1.zip"], "wikitext-2",
                   "WikiText-2 (v1, tokenized), word level"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser(dataset: str) -> argparse.ArgumentParser:
    _, archives, dest_name, desc = DATASETS[dataset]
    p = argparse.ArgumentParser(
        prog=os.environ.get("DATAPREP_PROG", f"dataprep.py {dataset}"), description=desc,
        epilog="Archives: " + ", ".join(archives) + ". Environment: GRNN_ARCHIVES (local "
               "archives or folders, separated by ':'), GRNN_DATA_CACHE (download cache), "
               "PYTHON (for the shell wrappers).",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("locations")
    g.add_argument("--destdir", default=f"data-bin/{dest_name}", help="output data-bin folder")
    g.add_argument("--work-dir", default=None,
                   help="intermediate files and done markers (default: work/prep/<destdir name>)")
    g.add_argument("--cache-dir", default=os.environ.get("GRNN_DATA_CACHE", "work/downloads"),
                   help="download cache")
    g.add_argument("--archive", action="append", metavar="PATH",
                   help="local copy of an archive (file, NAME=FILE, or a folder holding the "
                        "archives under their names); repeatable; no download then")
    g.add_argument("--url", action="append", metavar="NAME=URL",
                   help="download NAME from this URL (a mirror) instead")
    g = p.add_argument_group("verification")
    g.add_argument("--no-verify", action="store_true",
                   help="do not check sha256 sums (needed for archives whose sum is marked "
                        "TO BE VERIFIED, see `dataprep.py checksums`)")
    g.add_argument("--checksum", action="append", metavar="NAME=SHA256",
                   help="expected sha256 of an archive, overriding the table")
    g = p.add_argument_group("processing")
    subword = dataset not in ("ptb", "wikitext-2")
    if subword:
        default_vocab = {"iwslt14-de-en": 10000, "wmt14-en-de": 32000, "gigaword": 30000}[dataset]
        g.add_argument("--vocab-size", type=int, default=default_vocab,
                       help="sentencepiece vocabulary size (joint for both sides)")
        g.add_argument("--spm-type", default="bpe", choices=("bpe", "unigram"),
                       help="sentencepiece model type")
        g.add_argument("--spm-sample", type=int, default=5_000_000,
                       help="train sentencepiece on at most this many lines (0: all)")
    else:
        g.add_argument("--vocab-size", type=int, default=-1,
                       help="keep this many most frequent words (-1: all, i.e. the "
                            "dataset's own vocabulary exactly)")
    if dataset == "iwslt14-de-en":
        g.add_argument("--joined-dictionary", action="store_true",
                       help="one fairseq dictionary for both languages (default: separate, "
                            "as in fairseq's recipe)")
        g.add_argument("--min-len", type=int, default=1,
                       help="drop training pairs with a side shorter than this (words)")
        g.add_argument("--max-len", type=int, default=175,
                       help="drop training pairs with a side longer than this (words)")
        g.add_argument("--ratio", type=float, default=1.5,
                       help="drop training pairs whose length ratio exceeds this")
        g.add_argument("--valid-every", type=int, default=23,
                       help="every N-th cleaned training pair goes to valid")
        g.add_argument("--keep-case", action="store_true", help="do not lowercase")
        g.add_argument("--moses", action="store_true",
                       help="Moses-tokenize (sacremoses) before the length filter, as the "
                            "recipe does; default: whitespace words")
    elif dataset == "wmt14-en-de":
        g.add_argument("--separate-dictionaries", dest="joined_dictionary",
                       action="store_false",
                       help="separate source/target dictionaries (default: one joined)")
        g.add_argument("--max-len", type=int, default=250,
                       help="drop training pairs longer than this (subword tokens)")
        g.add_argument("--ratio", type=float, default=1.5, help="max length ratio (subwords)")
        g.add_argument("--moses", action="store_true",
                       help="Moses punctuation normalization + tokenization (sacremoses)")
    elif dataset == "gigaword":
        g.add_argument("--separate-dictionaries", dest="joined_dictionary",
                       action="store_false",
                       help="separate source/target dictionaries (default: one joined)")
        g.add_argument("--unk", choices=("map", "keep"), default="map",
                       help="map: the corpus' UNK (and <unk>) tokens become fairseq's <unk>; "
                            "keep: leave them as ordinary text")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads for sentencepiece, processes for fairseq-preprocess")
    g.add_argument("--fairseq-preprocess", default=os.environ.get("FAIRSEQ_PREPROCESS"),
                   metavar="CMD", help="command to run instead of `python -m "
                                       "fairseq_cli.preprocess`")
    g = p.add_argument_group("reruns")
    g.add_argument("--force", action="store_true",
                   help="redo every step (e.g. after replacing an archive)")
    g.add_argument("--rm-work", action="store_true",
                   help="delete the work folder after success")
    return p


def print_checksums() -> None:
    for a in ARCHIVES.values():
        print(f"{a.name}\n  sha256: {a.sha256 or 'TO BE VERIFIED'}\n  size:   "
              f"{a.size or '?'}\n  from:   {a.pinned_from}\n  url:    {a.urls[0]}")
        if a.md5:
            print(f"  md5:    {a.md5}\n  from:   {a.md5_from}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("datasets: " + ", ".join(DATASETS))
        return 0 if argv else 2
    if argv[0] == "checksums":
        print_checksums()
        return 0
    dataset = argv.pop(0)
    if dataset not in DATASETS:
        print(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}",
              file=sys.stderr)
        return 2
    opts = build_parser(dataset).parse_args(argv)
    func, archives, _, _ = DATASETS[dataset]
    opts.archives_of_dataset = archives
    if opts.work_dir is None:
        opts.work_dir = str(Path("work") / "prep" / Path(opts.destdir).name)
    word_level = dataset in ("ptb", "wikitext-2")
    if opts.vocab_size == 0 or opts.vocab_size < (-1 if word_level else 1):
        print("--vocab-size must be positive" + (" (or -1: all words)" if word_level else ""),
              file=sys.stderr)
        return 2
    try:
        return func(opts).run()
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished steps are kept, the next run goes on from there",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
