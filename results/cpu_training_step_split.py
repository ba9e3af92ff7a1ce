"""Where a CPU training step of an RNNSearch model spends its time: encoder forward,
decoder forward (the step-by-step loop), output layer and loss, backward, Adam.
Real batches of the Debian De-En corpus (at most 1,000 tokens), 5 untimed, 40 timed.

    OMP_NUM_THREADS=2 python results/cpu_training_step_split.py group_rnnsearch_k4
"""
import sys
import time

import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from debian_training_setup import training_setup

arch = sys.argv[1]
task, model, opt, batches = training_setup(arch, sys.argv[2:], 45)
parts = dict.fromkeys(("encoder", "decoder", "output+loss", "backward", "adam"), 0.0)


def step(b, timed):
    ni = b["net_input"]
    t = [time.perf_counter()]
    enc = model.encoder(ni["src_tokens"], ni["src_lengths"])
    t.append(time.perf_counter())
    feats, _ = model.decoder.extract_features(ni["prev_output_tokens"], enc)
    t.append(time.perf_counter())
    lp = torch.log_softmax(model.decoder.output_layer(feats).float(), -1)
    loss, _ = label_smoothed_nll_loss(lp.view(-1, lp.size(-1)), b["target"].view(-1), 0.1,
                                      ignore_index=task.target_dictionary.pad())
    t.append(time.perf_counter())
    opt.zero_grad()
    loss.backward()
    t.append(time.perf_counter())
    opt.step()
    t.append(time.perf_counter())
    if timed:
        for key, a, b_ in zip(parts, t, t[1:]):
            parts[key] += b_ - a
    return b["ntokens"]


for b in batches[:5]:
    step(b, False)
tokens = sum(step(b, True) for b in batches[5:])
total = sum(parts.values())
print(f"{arch}, {torch.get_num_threads()} threads: {tokens / total:.0f} target tok/s; "
      + ", ".join(f"{k} {v / total:.0%}" for k, v in parts.items()))
