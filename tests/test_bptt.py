"""--task bptt_language_modeling: the corpus as parallel streams, the recurrent state
carried from one segment to the next.

References: the streams against slices of the token sequence taken by hand, and the
segment-by-segment forward of the LM against one forward over each whole stream (what
carrying the state must reproduce)."""
import logging

import pytest
import torch

import grnn_fairseq  # noqa: F401  (registers the task and the models)
from fairseq import options, tasks
from fairseq.data import Dictionary, indexed_dataset
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from grnn_fairseq.bptt import TokenStreams, collate_segments, stream_batches
from grnn_fairseq.params import build_architecture

VOCAB = 30


def lm(cell, groups=1, rate=0.0, dropout=0.0):
    torch.manual_seed(0)
    model = build_architecture("restricted_lm", vocab=VOCAB, device="cpu", overrides=[
        "--cell", cell, "--decoder-groups", str(groups), "--sharing-rate", str(rate),
        "--decoder-embed-dim", "8", "--decoder-hidden-size", "8", "--decoder-layers", "2",
        "--dropout", str(dropout), "--rearrangement", "both"])
    return model.double()


def segments_of(streams, length):
    """[B, n] streams -> their segments of ``length`` tokens, in order."""
    return list(streams.split(length, dim=1))


# --------------------------------------------------------------------------- the streams
@pytest.mark.parametrize("n_tokens,streams,length", [(100, 3, 7), (101, 4, 5), (20, 19, 3)])
def test_streams_are_contiguous_slices_predicting_the_next_token(n_tokens, streams, length):
    tokens = torch.arange(n_tokens) + 1000
    data = TokenStreams(tokens, streams, length)
    per = (n_tokens - 1) // streams
    for s in range(streams):
        got_in = torch.cat([data[j * streams + s][2] for j in range(data.segments)])
        got_tgt = torch.cat([data[j * streams + s][3] for j in range(data.segments)])
        assert torch.equal(got_in, tokens[s * per:(s + 1) * per])
        assert torch.equal(got_tgt, tokens[s * per + 1:(s + 1) * per + 1])
    assert all(data[j * streams][1] == j for j in range(data.segments))


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_each_shard_reads_its_own_streams_in_order(shards):
    per_shard, segments = 2, 4
    batches = stream_batches(segments, per_shard, shards)
    total = per_shard * shards
    seen = []
    for r in range(shards):
        mine = batches[r::shards]  # what fairseq's ShardedIterator hands shard r
        assert [sorted({i // total for i in b}) for b in mine] == [[j] for j in range(segments)]
        assert all([i % total for i in b] == list(range(r * per_shard, (r + 1) * per_shard))
                   for b in mine)
        seen += [i for b in mine for i in b]
    assert sorted(seen) == list(range(segments * total))


def test_too_few_tokens_for_the_streams_is_a_clear_error():
    with pytest.raises(ValueError, match="--batch-size"):
        TokenStreams(torch.arange(5), 8, 3)


# --------------------------------------------------------------------------- carried state
@pytest.mark.parametrize("cell,groups,rate", [("lstm", 1, 0.0), ("lstm", 2, 0.0),
                                              ("gru", 1, 0.5), ("rnn", 2, 0.0)])
def test_segments_with_carried_state_equal_one_pass_over_each_stream(cell, groups, rate):
    model = lm(cell, groups, rate).eval()
    streams = torch.randint(4, VOCAB, (3, 23))
    with torch.no_grad():
        whole, _ = model(streams)
        parts = [model(seg, segment=torch.full((3,), j))[0]
                 for j, seg in enumerate(segments_of(streams, 5))]
        fresh = [model(seg)[0] for seg in segments_of(streams, 5)]
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-10)
    # without the segment index every segment starts from zeros (fairseq's language_modeling)
    assert not torch.allclose(torch.cat(fresh, dim=1), whole, atol=1e-3)


def test_training_and_evaluation_carry_separate_states():
    """A validation pass between two training segments leaves the training state alone."""
    model = lm("lstm")
    streams = torch.randint(4, VOCAB, (2, 15))
    seg = segments_of(streams, 5)
    with torch.no_grad():
        model.eval()
        whole, _ = model(streams)
        model.train()  # dropout 0: training mode computes the same numbers
        model(seg[0], segment=torch.zeros(2))
        model(seg[1], segment=torch.ones(2))
        model.eval()
        model(torch.randint(4, VOCAB, (4, 5)), segment=torch.zeros(4))
        model.train()
        third, _ = model(seg[2], segment=torch.full((2,), 2))
    assert torch.allclose(third, whole[:, 10:], atol=1e-10)


def test_no_gradient_flows_into_the_previous_segment():
    """Truncated BPTT: the loss of segment 1 reaches only segment 1's embeddings."""
    model = lm("lstm").train()
    first = torch.randint(4, 10, (2, 6))    # tokens 4..9 only here
    second = torch.randint(10, VOCAB, (2, 6))  # tokens 10.. only here
    model(first, segment=torch.zeros(2))
    model.zero_grad()
    out, _ = model(second, segment=torch.ones(2))
    out.sum().backward()
    grad = model.decoder.embed_tokens.weight.grad
    assert grad[4:10].abs().max() == 0
    assert grad[10:].abs().max() > 0


def test_segments_out_of_order_are_an_error_and_a_resumed_run_starts_from_zeros(caplog):
    model = lm("gru").eval()
    streams = torch.randint(4, VOCAB, (2, 15))
    seg = segments_of(streams, 5)
    with torch.no_grad():
        with caplog.at_level(logging.WARNING):
            resumed, _ = model(seg[1], segment=torch.ones(2))  # no state for segment 0
        assert "zero state" in caplog.text
        assert torch.allclose(resumed, model(seg[1])[0])
        with pytest.raises(RuntimeError, match="segment 3 of 2 streams follows segment 1"):
            model(seg[2], segment=torch.full((2,), 3))


# --------------------------------------------------------------------------- the task
def write_data_bin(path, lines):
    d = Dictionary()
    for line in lines:
        for w in line.split():
            d.add_symbol(w)
    d.save(str(path / "dict.txt"))
    for split in ("train", "valid"):
        builder = indexed_dataset.make_builder(str(path / f"{split}.bin"), impl="mmap",
                                               vocab_size=len(d))
        for line in lines:
            builder.add_item(d.encode_line(line, add_if_not_exist=False))
        builder.finalize(str(path / f"{split}.idx"))
    return d


def setup_task(path, *extra):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(path), "--task", "bptt_language_modeling",
                                                "--arch", "restricted_lm", *extra])
    return tasks.setup_task(convert_namespace_to_omegaconf(args).task)


def test_task_batches_are_the_streams_of_the_binarized_corpus(tmp_path):
    lines = [" ".join(f"w{(i * 7 + k) % 13}" for k in range(i % 5 + 2)) for i in range(40)]
    d = write_data_bin(tmp_path, lines)
    task = setup_task(tmp_path, "--tokens-per-sample", "4", "--batch-size", "3")
    task.load_dataset("train")
    corpus = torch.cat([d.encode_line(line, add_if_not_exist=False) for line in lines])
    assert torch.equal(task.dataset("train").tokens, corpus)  # every line ends with </s>
    per = (corpus.numel() - 1) // 6
    for shard in (0, 1):
        itr = task.get_batch_iterator(task.dataset("train"), max_sentences=3, num_shards=2,
                                      shard_id=shard).next_epoch_itr(shuffle=False)
        batches = list(itr)
        assert [int(b["net_input"]["segment"][0]) for b in batches] == list(range(len(batches)))
        rows = torch.cat([b["net_input"]["src_tokens"] for b in batches], dim=1)
        targets = torch.cat([b["target"] for b in batches], dim=1)
        for b in range(3):
            s = shard * 3 + b
            assert torch.equal(rows[b], corpus[s * per:(s + 1) * per])
            assert torch.equal(targets[b], corpus[s * per + 1:(s + 1) * per + 1])


@pytest.mark.parametrize("extra,message", [
    (["--max-tokens", "100"], "needs --batch-size >= 1"),
    (["--batch-size", "0"], "--batch-size=0"),
    (["--batch-size", "2", "--tokens-per-sample", "0"], "--tokens-per-sample=0"),
    (["--batch-size", "2", "--sample-break-mode", "eos"], "--sample-break-mode=eos"),
])
def test_task_option_errors_name_the_option(tmp_path, extra, message):
    write_data_bin(tmp_path, ["a b c d e f g h i j k"] * 5)
    with pytest.raises(ValueError, match=message):
        task = setup_task(tmp_path, "--tokens-per-sample", "4", *extra)
        task.load_dataset("train")
        task.get_batch_iterator(task.dataset("train"), max_sentences=task.args.batch_size)


def test_eval_lm_context_window_is_refused(tmp_path):
    write_data_bin(tmp_path, ["a b c d e f g h i j k"] * 5)
    task = setup_task(tmp_path, "--tokens-per-sample", "4", "--batch-size", "2")
    task.load_dataset("valid")
    with pytest.raises(ValueError, match="--context-window"):
        task.eval_lm_dataloader(task.dataset("valid"), batch_size=2, context_window=3)


def test_collated_batch_has_what_fairseq_criteria_read():
    data = TokenStreams(torch.arange(4, 40), 2, 5)
    batch = collate_segments([data[2], data[3]])  # segment 1 of streams 0 and 1
    assert batch["ntokens"] == 10 and batch["nsentences"] == 2
    assert batch["net_input"]["segment"].tolist() == [1, 1]
    assert batch["net_input"]["src_lengths"].tolist() == [5, 5]
    assert torch.equal(batch["target"][:, :-1], batch["net_input"]["src_tokens"][:, 1:])


def test_hub_score_and_sample_work_on_a_bptt_checkpoint_task(tmp_path):
    """A model trained with --task bptt_language_modeling keeps that task in its checkpoint,
    and fairseq's hub interface (``RecurrentLanguageModel.from_pretrained(...)``: ``score``,
    ``sample``) and fairseq-interactive batch their sentences through the task's
    get_batch_iterator. Sentences are not one stream: they must batch as in fairseq's LM
    task, and each score must equal one forward pass over that sentence alone."""
    from fairseq.hub_utils import GeneratorHubInterface

    lines = [" ".join(f"w{(i * 7 + k) % 13}" for k in range(i % 5 + 2)) for i in range(40)]
    d = write_data_bin(tmp_path, lines)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(tmp_path), "--task", "bptt_language_modeling", "--arch", "restricted_lm",
        "--tokens-per-sample", "4", "--batch-size", "3", "--decoder-embed-dim", "8",
        "--decoder-hidden-size", "8", "--decoder-layers", "2", "--dropout", "0"])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model).eval()
    hub = GeneratorHubInterface(cfg, task, [model]).eval()
    sentences = ["w1 w2 w3", "w4 w5 w6 w7 w8 w9", "w10"]
    for sentence, scored in zip(sentences, hub.score(sentences)):
        tokens = d.encode_line(sentence, add_if_not_exist=False)  # words + </s>
        inputs = torch.cat([tokens.new_tensor([d.eos()]), tokens[:-2]]).unsqueeze(0)
        with torch.no_grad():
            logp = torch.log_softmax(model(inputs)[0].double(), dim=-1)[0]
        expected = logp.gather(-1, tokens[:-1].unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(scored["positional_scores"].double(), expected, atol=1e-5)
    assert hub.sample("w1 w2", beam=1).startswith("w1 w2")
