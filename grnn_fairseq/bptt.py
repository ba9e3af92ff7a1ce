"""Language modeling with the recurrent state carried across segments (truncated BPTT).

The PTB and WikiText-2 language models of both papers are trained as in Zaremba et al.
(2014): the corpus is one token sequence, cut into B parallel streams; each batch holds
the next T tokens of every stream, and the recurrent state at the end of a batch is the
initial state of the next one (gradients stop at the batch boundary). fairseq's
``language_modeling`` task starts every segment from a zero state instead.

``--task bptt_language_modeling`` keeps fairseq's language-modeling options, dictionary
and model checks; ``--batch-size`` is the number of streams per process and
``--tokens-per-sample`` the segment length T. Every batch carries its segment index, and
the recurrent LMs (``grnn_fairseq.models.rnn_lm``) keep the state between segments, one
state for training and one for evaluation. With several processes the streams are split
between them, each process reading its own streams in order.
"""
import logging
import math
import os
from dataclasses import dataclass

import torch
from fairseq import utils
from fairseq.data import FairseqDataset, data_utils, iterators
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from .errors import ConfigError

logger = logging.getLogger(__name__)


class TokenSequence(FairseqDataset):
    """A whole split as one 1-D token tensor (fairseq's tasks keep FairseqDatasets)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return self.tokens.numel()

    def __getitem__(self, i):
        return self.tokens[i]


class TokenStreams(torch.utils.data.Dataset):
    """A token sequence as ``streams`` equal rows, read ``length`` tokens at a time.

    Row s holds tokens [s*n, (s+1)*n) of the sequence with n = (N - 1) // streams, and
    the targets are the same positions shifted by one: every token but the first and the
    last (N - 1) mod streams is predicted exactly once. Item i = j * streams + s is
    segment j of stream s: (i, j, input tokens, target tokens)."""

    def __init__(self, tokens, streams, length):
        self.per_stream = (tokens.numel() - 1) // streams
        if self.per_stream < 1:
            raise ConfigError(f"{tokens.numel()} tokens cannot fill {streams} streams; lower "
                              f"--batch-size (or --batch-size-valid) or use more data")
        n = streams * self.per_stream
        self.inputs = tokens[:n].view(streams, self.per_stream)
        self.targets = tokens[1:n + 1].view(streams, self.per_stream)
        self.streams, self.length = streams, length
        self.segments = math.ceil(self.per_stream / length)

    def __len__(self):
        return self.segments * self.streams

    def __getitem__(self, i):
        j, s = divmod(i, self.streams)
        part = slice(j * self.length, min((j + 1) * self.length, self.per_stream))
        return i, j, self.inputs[s, part], self.targets[s, part]


def collate_segments(items):
    """One batch: the same segment of several streams (equal lengths, no padding)."""
    ids, segments, inputs, targets = zip(*items)
    src = torch.stack(inputs)
    return {
        "id": torch.tensor(ids),
        "nsentences": len(items),
        "ntokens": src.numel(),
        "net_input": {
            "src_tokens": src,
            "src_lengths": torch.full((len(items),), src.shape[1], dtype=torch.long),
            "segment": torch.tensor(segments),
        },
        "target": torch.stack(targets),
    }


def stream_batches(segments, streams_per_shard, num_shards):
    """Batch k = j * num_shards + r holds segment j of shard r's streams, so fairseq's
    sharding (every num_shards-th batch from shard_id) gives each process its own
    streams, segment after segment."""
    total = streams_per_shard * num_shards
    return [[j * total + r * streams_per_shard + b for b in range(streams_per_shard)]
            for j in range(segments) for r in range(num_shards)]


@dataclass
class BPTTLanguageModelingConfig(LanguageModelingConfig):
    """fairseq's language-modeling options; --batch-size is the number of streams."""


@register_task("bptt_language_modeling", dataclass=BPTTLanguageModelingConfig)
class BPTTLanguageModelingTask(LanguageModelingTask):
    """Language modeling in contiguous streams with the state carried across segments."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        if self.args.sample_break_mode not in (None, "none"):
            raise ConfigError(f"--sample-break-mode={self.args.sample_break_mode}: "
                              "bptt_language_modeling reads the corpus as one stream; leave "
                              "it at none (or use --task language_modeling)")
        if not self.args.tokens_per_sample or self.args.tokens_per_sample < 1:
            raise ConfigError(f"--tokens-per-sample={self.args.tokens_per_sample}: the segment "
                              "length (backpropagation steps) must be at least 1, e.g. 35")
        if self.targets != ["future"] or self.args.add_bos_token:
            raise ConfigError("bptt_language_modeling predicts the next token only: drop "
                              "--self-target/--past-target/--add-bos-token")

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        paths = utils.split_paths(self.args.data)
        split_path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        lines = data_utils.load_indexed_dataset(split_path, self.dictionary,
                                                self.args.dataset_impl, combine=combine)
        if lines is None:
            raise FileNotFoundError(f"Dataset not found: {split} ({split_path}); "
                                    "binarize it with fairseq-preprocess --only-source")
        # fairseq-preprocess ends every line with </s>, as the papers' corpora do
        self.datasets[split] = TokenSequence(torch.cat([lines[i] for i in range(len(lines))]))
        logger.info(f"{split}: {len(self.datasets[split]):,} tokens as one stream")

    def get_batch_iterator(self, dataset, max_sentences=None, num_shards=1, shard_id=0,
                           num_workers=0, epoch=1, data_buffer_size=0,
                           skip_remainder_batch=False, **kwargs):
        if not isinstance(dataset, TokenSequence):
            # sentences this task did not load as one stream: build_dataset_for_inference's
            # (the hub's score / sample, fairseq-interactive) batch as fairseq's LM task does
            return super().get_batch_iterator(
                dataset, max_sentences=max_sentences, num_shards=num_shards, shard_id=shard_id,
                num_workers=num_workers, epoch=epoch, data_buffer_size=data_buffer_size,
                skip_remainder_batch=skip_remainder_batch, **kwargs)
        if not max_sentences or max_sentences < 1:
            raise ConfigError(f"--batch-size={max_sentences}: bptt_language_modeling needs "
                              "--batch-size >= 1, the number of parallel token streams per "
                              "process (--max-tokens does not apply)")
        streams = TokenStreams(dataset.tokens, max_sentences * num_shards,
                               self.args.tokens_per_sample)
        return iterators.EpochBatchIterator(
            dataset=streams, collate_fn=collate_segments,
            batch_sampler=stream_batches(streams.segments, max_sentences, num_shards),
            num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
            buffer_size=data_buffer_size, disable_shuffling=True,
            skip_remainder_batch=skip_remainder_batch)

    def eval_lm_dataloader(self, dataset, max_tokens=None, batch_size=None,
                           max_positions=None, num_shards=1, shard_id=0, num_workers=1,
                           data_buffer_size=10, context_window=0):
        if context_window > 0:
            raise ConfigError("--context-window does not apply to bptt_language_modeling: "
                              "every segment starts from the state the previous one ended in")
        return self.get_batch_iterator(
            dataset, max_sentences=batch_size, num_shards=num_shards, shard_id=shard_id,
            num_workers=num_workers, data_buffer_size=data_buffer_size,
        ).next_epoch_itr(shuffle=False)
