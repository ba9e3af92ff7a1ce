"""Offline tests of the public-dataset scripts (scripts/prepare-*.sh, scripts/dataprep.py).

Every script runs on tiny look-alike archives made by tests/fixtures/public/make_fixtures.py
(same file names and markup as the real releases, made-up lines), with a tiny vocabulary.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
FIXTURE_MAKER = ROOT / "tests" / "fixtures" / "public" / "make_fixtures.py"

HAVE_FAIRSEQ = importlib.util.find_spec("fairseq") is not None
HAVE_SPM = importlib.util.find_spec("sentencepiece") is not None
needs_fairseq = pytest.mark.skipif(not (HAVE_FAIRSEQ and HAVE_SPM),
                                   reason="needs fairseq and sentencepiece")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


dataprep = _load("dataprep_under_test", SCRIPTS / "dataprep.py")
fixtures_mod = _load("public_fixtures", FIXTURE_MAKER)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(script: str, *args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("GRNN_ARCHIVES", "GRNN_DATA_CACHE", "FAIRSEQ_PREPROCESS")},
           **(env or {}), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPTS / script), *args, "--workers", "1"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith((".partial", ".old", ".part", ".tmp")))


_DTYPES = {1: "u1", 2: "i1", 3: "i2", 4: "i4", 5: "i8", 6: "f8", 7: "f8", 8: "u2", 9: "u4",
           10: "u8"}


def read_bin(prefix: Path) -> list[list[int]]:
    """The sequences of a fairseq mmap dataset (prefix.idx / prefix.bin), read with numpy
    (format of fairseq.data.indexed_dataset.MMapIndexedDataset) to keep torch out of here."""
    import numpy as np
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    dtype = np.dtype(_DTYPES[raw[17]])
    n = int(np.frombuffer(raw, "<u8", 1, 18)[0])
    sizes = np.frombuffer(raw, "<i4", n, 26)
    pointers = np.frombuffer(raw, "<i8", n, 26 + 4 * n)
    data = Path(f"{prefix}.bin").read_bytes()
    return [np.frombuffer(data, dtype, int(c), int(o)).tolist() for c, o in zip(sizes, pointers)]


class FsDict:
    """fairseq's Dictionary as fairseq-preprocess saves it: 4 specials, then dict.txt."""

    def __init__(self, path: Path):
        self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [l.split(" ")[0] for l in lines(path)]
        self.nspecial = 4

    def __getitem__(self, i: int) -> str:
        return self.symbols[i]

    def __len__(self) -> int:
        return len(self.symbols)

    def unk(self) -> int:
        return 3


def load_dict(path: Path) -> FsDict:
    return FsDict(path)


def dict_words(path: Path) -> dict[str, int]:
    return {w: int(c) for w, c in (line.split(" ")[:2] for line in lines(path))}


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    out = tmp_path_factory.mktemp("public-fixtures")
    info = fixtures_mod.build_all(out)
    return out, info


@pytest.fixture(scope="session")
def e2e(fx, tmp_path_factory):
    """The end-to-end runs (each a chain of script runs in its own folder), two at a time
    in background threads: they spend most of their time importing fairseq."""
    if not (HAVE_FAIRSEQ and HAVE_SPM):
        pytest.skip("needs fairseq and sentencepiece")
    chains = {"iwslt": chain_iwslt, "ptb": chain_ptb, "wmt14": chain_wmt14,
              "gigaword": chain_gigaword, "wikitext2": chain_wikitext2}

    def call(name, fn):
        cwd = tmp_path_factory.mktemp(name)
        return {"cwd": cwd, **fn(fx, cwd)}

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(call, name, fn) for name, fn in chains.items()}


def test_fixtures_are_tiny_and_reproducible(fx, tmp_path):
    out, _ = fx
    total = sum(p.stat().st_size for p in out.iterdir())
    assert total < 200_000
    fixtures_mod.build_all(tmp_path)
    for p in out.iterdir():
        assert sha256(p) == sha256(tmp_path / p.name), p.name


# ------------------------------------------------------------------------------ helpers

def test_clean_rule_and_tag_stripping():
    ok_ = dataprep.length_ratio_ok
    assert ok_(2, 3, 1, 175, 1.5) and ok_(3, 2, 1, 175, 1.5)
    assert not ok_(2, 4, 1, 175, 1.5) and not ok_(0, 0, 1, 175, 1.5)
    assert ok_(175, 175, 1, 175, 1.5) and not ok_(176, 175, 1, 175, 1.5)
    line = dataprep.iwslt_train_line
    assert line("<url>http://x</url>") is None
    assert line("<talkid>7</talkid>") is None and line("<keywords>a, b</keywords>") is None
    assert line("<title>A: B</title>") == "A: B"
    assert line("<description>TED  Talk</description>") == "TED Talk"
    assert dataprep._UNK_TOKEN.sub("<unk>", "UNK a UNKNOWN <unk> UNK") == \
        "<unk> a UNKNOWN <unk> <unk>"


def test_checksum_table_lists_unverified(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPTS / "dataprep.py"), "checksums"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0
    assert "TO BE VERIFIED" in proc.stdout and "wikitext-2-v1.zip" in proc.stdout
    no_sha = {a.name for a in dataprep.ARCHIVES.values() if a.sha256 is None}
    assert no_sha == {"de-en.tgz", "test-full.tgz", "simple-examples.tgz"}
    unchecked = {a.name for a in dataprep.ARCHIVES.values() if a.sha256 is None and a.md5 is None}
    assert unchecked == {"de-en.tgz"}
    assert "md5:    a8cd784e006feb32ac6f3d9ec7eb389a" in proc.stdout


def test_md5_pins_agree_with_sacrebleu_registry():
    """The WMT md5s in our table are the ones sacrebleu (an independent, maintained
    registry that verifies them on every download) publishes for the same URLs."""
    from sacrebleu.dataset import DATASETS

    def registry(name):
        d = DATASETS[name]
        d = d if isinstance(d, dict) else vars(d)
        return dict(zip(d["data"], d["md5"]))

    for arch, key in (("test-full.tgz", "wmt14/full"), ("dev.tgz", "wmt19/dev")):
        a = dataprep.ARCHIVES[arch]
        published = registry(key)
        assert len(published) == 1
        url, md5 = next(iter(published.items()))
        # same file: same path on the server (sacrebleu uses https and no www.)
        assert url.split("statmt.org", 1)[1] == a.urls[0].split("statmt.org", 1)[1]
        assert a.md5 == md5 and key in a.md5_from


# ------------------------------------------------------------------------------ IWSLT14

IWSLT = "data-bin/iwslt14.de-en"
IWSLT_WORK = "work/prep/iwslt14.de-en"


def chain_iwslt(fx, cwd: Path) -> dict:
    """Downloads the fixture (file:// URL) into an empty cache with its sha256 pinned;
    then reruns (everything skipped, without the archive); then builds a joined-dictionary
    data-bin from the same work folder."""
    out, info = fx
    arch = out / "de-en.tgz"
    res = {"cwd": cwd, "exp": info["iwslt14"]}
    res["main"] = run("prepare-iwslt14-de-en.sh", "--vocab-size", "120", "--cache-dir", "cache",
                      "--url", f"de-en.tgz={arch.as_uri()}",
                      "--checksum", f"de-en.tgz={sha256(arch)}", cwd=cwd)
    if res["main"].returncode != 0:
        return res
    db = cwd / IWSLT
    res["cached"] = (cwd / "cache" / "de-en.tgz").is_file()
    res["main_leftovers"] = leftovers(cwd)
    res["mtimes_before"] = {p.name: p.stat().st_mtime_ns for p in db.iterdir()}
    (cwd / "cache" / "de-en.tgz").unlink()                   # not even the archive is needed
    res["rerun"] = run("prepare-iwslt14-de-en.sh", "--vocab-size", "120", "--cache-dir", "cache",
                       "--url", "de-en.tgz=file:///nonexistent/de-en.tgz", cwd=cwd)
    res["mtimes_after"] = {p.name: p.stat().st_mtime_ns for p in db.iterdir()}
    res["joined"] = run("prepare-iwslt14-de-en.sh", "--vocab-size", "120",
                        "--joined-dictionary", "--destdir", "data-bin/joined",
                        "--work-dir", IWSLT_WORK, cwd=cwd)
    return res


@pytest.fixture(scope="module")
def iwslt_run(e2e):
    res = e2e["iwslt"].result()
    ok(res["main"])
    return res


@needs_fairseq
def test_iwslt_split_cleaning_and_test_set(iwslt_run):
    cwd, exp, proc = iwslt_run["cwd"], iwslt_run["exp"], iwslt_run["main"]
    assert iwslt_run["cached"]                               # downloaded into the cache
    assert "sha256 OK" in proc.stderr
    text = cwd / IWSLT_WORK / "text"
    kept = list(zip(*[[p[i] for p in exp["train"] + exp["valid"]] for i in (0, 1)]))
    assert len(kept) == exp["n_kept"] < exp["n_body"]       # the filter dropped pairs
    # valid = every 23rd pair of the cleaned corpus, train = the others, order kept
    assert len(exp["valid"]) == exp["n_kept"] // 23 == 2
    for lang, i in (("de", 0), ("en", 1)):
        assert lines(text / f"train.{lang}") == [p[i] for p in exp["train"]]
        assert lines(text / f"valid.{lang}") == [p[i] for p in exp["valid"]]
        assert lines(text / f"test.{lang}") == exp["test"][lang]
    train_de = lines(text / "train.de")
    body = "\n".join(train_de + lines(text / "train.en"))
    assert "<" not in body and ">" not in body               # tags stripped ...
    assert "jane roe 0: ein großes haus" in train_de          # ... title text kept
    assert body == body.lower()                               # lowercased
    assert "ja genau" in train_de                             # ratio exactly 1.5: kept
    assert " ".join(["wort"] * 175) in train_de               # 175 words: kept
    assert " ".join(["wort"] * 180) not in train_de           # 180 words: dropped
    assert "ja klar" not in train_de and "" not in train_de   # ratio 4, empty: dropped
    # test = dev2010 + dev2012 + tst2010 + tst2011 + tst2012, in that order
    test_en = lines(text / "test.en")
    order = [l.split(" from ")[1].split()[0] for l in test_en]
    assert order == sorted(order, key=["dev2010", "dev2012", "tst2010", "tst2011",
                                       "tst2012"].index)
    assert test_en[0] == "it's sentence 1 from dev2010 & more ."

    db = cwd / IWSLT
    info = json.loads((db / ".prepare-done.json").read_text())
    assert info["stats"]["cleaned_pairs"] == exp["n_kept"]
    assert (db / "dict.de.txt").read_text() != (db / "dict.en.txt").read_text()  # separate
    for split, n in (("train", len(exp["train"])), ("valid", 2), ("test", len(test_en))):
        for lang in ("de", "en"):
            assert len(read_bin(db / f"{split}.de-en.{lang}")) == n
    # end to end: the binarized valid set decodes back to the cleaned text
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(db / "spm.model"))
    for lang, i in (("de", 0), ("en", 1)):
        d = load_dict(db / f"dict.{lang}.txt")
        decoded = [sp.decode_pieces([d[t] for t in ids[:-1]])
                   for ids in read_bin(db / f"valid.de-en.{lang}")]
        assert decoded == [p[i] for p in exp["valid"]]
    assert iwslt_run["main_leftovers"] == []


@needs_fairseq
def test_iwslt_rerun_skips_everything(iwslt_run):
    proc = ok(iwslt_run["rerun"])
    assert "already prepared" in proc.stderr
    assert iwslt_run["mtimes_after"] == iwslt_run["mtimes_before"]


@needs_fairseq
def test_iwslt_joined_dictionary_reuses_finished_steps(iwslt_run):
    proc = ok(iwslt_run["joined"])
    for step in ("extract", "text", "spm", "encode"):
        assert f"step {step}: already done, skipped" in proc.stderr
    db = iwslt_run["cwd"] / "data-bin/joined"
    assert (db / "dict.de.txt").read_text() == (db / "dict.en.txt").read_text()
    assert len(read_bin(db / "train.de-en.en")) == len(iwslt_run["exp"]["train"])


# ------------------------------------------------------------------------------ errors

def _no_output(cwd: Path, name: str = "iwslt14.de-en"):
    assert not (cwd / "data-bin" / name).exists()
    assert not (cwd / "work" / "prep" / name / "extract").exists()
    assert leftovers(cwd) == []


def test_checksum_mismatch_is_a_hard_error(fx, tmp_path):
    out, _ = fx
    arch = out / "de-en.tgz"
    proc = run("prepare-iwslt14-de-en.sh", "--archive", str(arch),
               "--checksum", "de-en.tgz=" + "0" * 64, cwd=tmp_path)
    assert proc.returncode == 1
    err = proc.stderr
    assert "checksum mismatch for de-en.tgz" in err and str(arch) in err
    assert "expected sha256 " + "0" * 64 in err and sha256(arch) in err
    assert "good copy" in err and "Traceback" not in err
    _no_output(tmp_path)


def test_pinned_checksum_mismatch(fx, tmp_path):
    """The table's real sum is enforced: the fixture is not the real wikitext-2-v1.zip."""
    out, _ = fx
    proc = run("prepare-wikitext2.sh", "--archive", str(out / "wikitext-2-v1.zip"), cwd=tmp_path)
    assert proc.returncode == 1
    assert dataprep.ARCHIVES["wikitext-2-v1.zip"].sha256 in proc.stderr
    assert "checksum mismatch for wikitext-2-v1.zip" in proc.stderr
    _no_output(tmp_path, "wikitext-2")


def test_unpinned_checksum_needs_no_verify(fx, tmp_path):
    out, _ = fx
    arch = out / "de-en.tgz"
    proc = run("prepare-iwslt14-de-en.sh", "--archive", str(arch), cwd=tmp_path)
    assert proc.returncode == 1
    assert "TO BE VERIFIED" in proc.stderr and "--no-verify" in proc.stderr
    assert f"--checksum de-en.tgz={sha256(arch)}" in proc.stderr
    _no_output(tmp_path)


def test_published_md5_is_enforced(fx, tmp_path):
    """simple-examples.tgz has no sha256 pinned but a published md5: the fixture is not
    the real archive, so it is refused, naming the md5 and who publishes it."""
    out, _ = fx
    arch = out / "simple-examples.tgz"
    proc = run("prepare-ptb.sh", "--archive", str(arch), cwd=tmp_path)
    assert proc.returncode == 1
    md5 = hashlib.md5(arch.read_bytes()).hexdigest()
    assert f"expected md5 {dataprep.ARCHIVES['simple-examples.tgz'].md5}" in proc.stderr
    assert f"got {md5}" in proc.stderr and "PaddlePaddle" in proc.stderr
    assert "Traceback" not in proc.stderr
    _no_output(tmp_path, "ptb")
    # a sum given on the command line replaces the table's (sha256 and md5 alike)
    ok = run("prepare-ptb.sh", "--archive", str(arch), "--checksum",
             f"simple-examples.tgz={sha256(arch)}", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "sha256 OK" in ok.stderr


def test_corrupt_archive(fx, tmp_path):
    out, _ = fx
    bad = tmp_path / "incoming" / "de-en.tgz"
    bad.parent.mkdir()
    data = (out / "de-en.tgz").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    proc = run("prepare-iwslt14-de-en.sh", "--no-verify", cwd=tmp_path,
               env={"GRNN_ARCHIVES": str(bad.parent)})           # local archives via env
    assert proc.returncode == 1
    assert f"cannot read de-en.tgz ({bad})" in proc.stderr
    assert "truncated or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
    _no_output(tmp_path)


def test_truncated_download(fx, tmp_path):
    out, _ = fx
    good = out / "de-en.tgz"
    short = tmp_path / "short.tgz"
    short.write_bytes(good.read_bytes()[:1000])
    proc = run("prepare-iwslt14-de-en.sh", "--cache-dir", "cache", "--url",
               f"de-en.tgz={short.as_uri()}", "--checksum", f"de-en.tgz={sha256(good)}",
               cwd=tmp_path)
    assert proc.returncode == 1
    assert "checksum mismatch for de-en.tgz" in proc.stderr
    assert f"delete the cached file {Path('cache') / 'de-en.tgz'}" in proc.stderr
    _no_output(tmp_path)


def test_failed_download_says_how_to_get_the_file(tmp_path):
    proc = run("prepare-iwslt14-de-en.sh", "--cache-dir", "cache", "--url",
               "de-en.tgz=file:///nonexistent/de-en.tgz", cwd=tmp_path)
    assert proc.returncode == 1
    err = proc.stderr
    assert "could not download de-en.tgz" in err and "--archive PATH" in err
    assert "dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz" in err
    assert not (tmp_path / "cache" / "de-en.tgz").exists()
    _no_output(tmp_path)


def test_wrong_archive(fx, tmp_path):
    out, _ = fx
    proc = run("prepare-iwslt14-de-en.sh", "--archive", str(out / "simple-examples.tgz"),
               "--no-verify", cwd=tmp_path)
    assert proc.returncode == 1
    assert "does not contain de-en/train.tags.de-en.de" in proc.stderr
    assert "not the expected archive" in proc.stderr
    _no_output(tmp_path)


def test_foreign_destdir_is_not_overwritten(fx, tmp_path):
    out, _ = fx
    (tmp_path / "data-bin" / "ptb").mkdir(parents=True)
    (tmp_path / "data-bin" / "ptb" / "mine.txt").write_text("keep me")
    proc = run("prepare-ptb.sh", "--archive", str(out / "simple-examples.tgz"), "--no-verify",
               cwd=tmp_path)
    assert proc.returncode == 1 and "not completed by this script" in proc.stderr
    assert (tmp_path / "data-bin" / "ptb" / "mine.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------ PTB

FAKE_PREPROCESS = """
import sys
dest = sys.argv[sys.argv.index("--destdir") + 1]
open(dest + "/dict.txt", "w").write("half 1\\n")
open(dest + "/train.bin", "wb").write(b"\\0" * 10)
sys.exit("simulated crash")
"""


def chain_ptb(fx, cwd: Path) -> dict:
    """A first run whose fairseq-preprocess dies half-way, then a normal run."""
    out, info = fx
    fake = cwd / "fake_preprocess.py"
    fake.write_text(FAKE_PREPROCESS)
    args = ("--archive", str(out / "simple-examples.tgz"), "--no-verify")
    failed = run("prepare-ptb.sh", *args, "--fairseq-preprocess", f"{sys.executable} {fake}",
                 cwd=cwd)
    state = {"exists": (cwd / "data-bin" / "ptb").exists(), "leftovers": leftovers(cwd)}
    # a kill at another moment leaves temporary folders; the next run removes them
    (cwd / "work/prep/ptb/extract.partial").mkdir(parents=True, exist_ok=True)
    (cwd / "data-bin/.ptb.partial").mkdir(parents=True, exist_ok=True)
    second = run("prepare-ptb.sh", *args, cwd=cwd)
    return {"cwd": cwd, "exp": info["ptb"], "failed": failed, "state": state, "second": second,
            "leftovers": leftovers(cwd)}


@pytest.fixture(scope="module")
def ptb_run(e2e):
    res = e2e["ptb"].result()
    ok(res["second"])
    return res["cwd"], res["exp"], res["failed"], res["state"], res


@needs_fairseq
def test_ptb_interrupted_run_leaves_no_databin(ptb_run):
    cwd, _, failed, state, res = ptb_run
    assert failed.returncode == 1 and "fairseq-preprocess failed" in failed.stderr
    assert "simulated crash" in failed.stderr
    assert state == {"exists": False, "leftovers": []}
    assert "step extract: already done, skipped" in res["second"].stderr
    assert res["leftovers"] == []


@needs_fairseq
def test_ptb_vocabulary_kept_exactly(ptb_run):
    cwd, exp, _, _, _ = ptb_run
    db = cwd / "data-bin" / "ptb"
    train_words = [w for line in exp["train"] for w in line.split()]
    types = set(train_words)
    assert "<unk>" in types
    words = dict_words(db / "dict.txt")
    assert set(words) == types - {"<unk>"}                    # all and only PTB's words
    assert all(words[w] == train_words.count(w) for w in words)
    assert not any(w.startswith("madeupword") for w in words)  # no padding
    d = load_dict(db / "dict.txt")
    assert len(d) == len(types) - 1 + d.nspecial
    for split in ("train", "valid", "test"):
        data = read_bin(db / split)
        assert len(data) == len(exp[split])
        for ids, line in zip(data, exp[split]):
            assert [d[i] for i in ids] == line.split() + ["</s>"]
    stats = json.loads((db / ".prepare-done.json").read_text())["stats"]
    assert stats["vocab_types_incl_eos"] == len(types) + 1
    assert stats["valid_oov_tokens"] == stats["test_oov_tokens"] == 0


# ------------------------------------------------------------------------------ WikiText-2

def chain_wikitext2(fx, cwd: Path) -> dict:
    out, _ = fx
    proc = run("prepare-wikitext2.sh", "--archive", str(out / "wikitext-2-v1.zip"),
               "--no-verify", cwd=cwd)
    return {"proc": proc, "leftovers": leftovers(cwd)}


@needs_fairseq
def test_wikitext2(fx, e2e):
    res = e2e["wikitext2"].result()
    ok(res["proc"])
    tmp_path, exp = res["cwd"], fx[1]["wikitext2"]
    db = tmp_path / "data-bin" / "wikitext-2"
    types = {w for line in exp["train"] for w in line.split()}
    assert set(dict_words(db / "dict.txt")) == types - {"<unk>"}
    d = load_dict(db / "dict.txt")
    for split in ("train", "valid", "test"):
        data = read_bin(db / split)
        assert len(data) == len(exp[split])                   # blank lines kept (as </s>)
        assert [[d[i] for i in ids] for ids in data] == [l.split() + ["</s>"] for l in exp[split]]
    assert res["leftovers"] == []


# ------------------------------------------------------------------------------ WMT14

def chain_wmt14(fx, cwd: Path) -> dict:
    out, _ = fx
    proc = run("prepare-wmt14-en-de.sh", "--archive", str(out), "--no-verify",
               "--vocab-size", "150", cwd=cwd)
    return {"proc": proc, "leftovers": leftovers(cwd)}


@needs_fairseq
def test_wmt14(fx, e2e):
    res = e2e["wmt14"].result()
    ok(res["proc"])
    tmp_path, exp = res["cwd"], fx[1]["wmt14"]
    text = tmp_path / "work/prep/wmt14.en-de/text"
    enc = tmp_path / "work/prep/wmt14.en-de/encode"
    db = tmp_path / "data-bin/wmt14.en-de"
    # Europarl + Common Crawl + News Commentary, in order; empty pairs and control
    # characters removed, no line split at U+2028 or a stray CR
    assert lines(text / "train.en") == [a for a, _ in exp["train_text"]]
    assert lines(text / "train.de") == [b for _, b in exp["train_text"]]
    # newstest2013 / newstest2014 from the right SGML files
    assert lines(text / "valid.en") == [a for a, _ in exp["valid"]]
    assert lines(text / "valid.de") == [b for _, b in exp["valid"]]
    assert lines(text / "test.en") == [a for a, _ in exp["test"]]
    assert lines(text / "test.de") == [b for _, b in exp["test"]]
    assert "Tom & Jerry's house ." in lines(text / "valid.en")
    # length (1-250) / ratio (1.5) filter on sentencepiece tokens, training data only
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(db / "spm.model"))
    expected = []
    for a, b in exp["train_text"]:
        pa, pb = sp.encode(a, out_type=str), sp.encode(b, out_type=str)
        if dataprep.length_ratio_ok(len(pa), len(pb), 1, 250, 1.5):
            expected.append((" ".join(pa), " ".join(pb)))
    assert list(zip(lines(enc / "train.en"), lines(enc / "train.de"))) == expected
    assert len(expected) <= len(exp["train_text"]) - exp["dropped_after_bpe"]
    assert not any(l.startswith("▁Yes ▁.") for l in lines(enc / "train.en"))
    assert (db / "dict.en.txt").read_text() == (db / "dict.de.txt").read_text()  # joined
    for split, n in (("train", len(expected)), ("valid", 4), ("test", 5)):
        assert len(read_bin(db / f"{split}.en-de.en")) == n
        assert len(read_bin(db / f"{split}.en-de.de")) == n


# ------------------------------------------------------------------------------ Gigaword

def chain_gigaword(fx, cwd: Path) -> dict:
    out, _ = fx
    proc = run("prepare-gigaword.sh", "--archive", str(out / "summary.tar.gz"), "--no-verify",
               "--vocab-size", "80", cwd=cwd)
    return {"proc": proc, "leftovers": leftovers(cwd)}


@needs_fairseq
def test_gigaword(fx, e2e):
    res = e2e["gigaword"].result()
    ok(res["proc"])
    tmp_path, exp = res["cwd"], fx[1]["gigaword"]
    text = tmp_path / "work/prep/gigaword/text"
    db = tmp_path / "data-bin/gigaword"
    for split in ("train", "valid", "test"):
        assert lines(text / f"{split}.src") == [a for a, _ in exp[split]]
        assert lines(text / f"{split}.tgt") == [b for _, b in exp[split]]
    assert len(exp["train"]) == 39 and len(exp["test"]) == 7  # empty title dropped, test whole
    assert "<unk>" in lines(text / "test.src")
    d = load_dict(db / "dict.src.txt")
    assert (db / "dict.src.txt").read_text() == (db / "dict.tgt.txt").read_text()
    assert not any("UNK" in w or "unk" in w for w in dict_words(db / "dict.src.txt"))
    for split in ("train", "valid", "test"):
        for lang, i in (("src", 0), ("tgt", 1)):
            data = read_bin(db / f"{split}.src-tgt.{lang}")
            assert len(data) == len(exp[split])
            # every UNK of the corpus became exactly one fairseq <unk>
            assert [ids.count(d.unk()) for ids in data] == \
                [p[i].split().count("<unk>") for p in exp[split]]
    assert (db / "spm.model").is_file() and res["leftovers"] == []
