"""Attention alone: the former tanh form of the additive attention against the sigmoid form
(grnn_fairseq.attention), interleaved in one process, one thread, median of 5 x 20 calls.
From the repository root: python results/cpu_attention_ab.py"""
import torch, time
import torch.nn.functional as F
torch.set_num_threads(1)
from grnn_fairseq.attention import AdditiveAttention
class Old(AdditiveAttention):
    def forward(self, query, keys, values, padding_mask=None):
        scores = self.score(torch.tanh(keys + self.query_proj(query).unsqueeze(0))).squeeze(-1)
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask, float("-inf"))
        weights = F.softmax(scores.float(), dim=0).type_as(scores)
        return torch.einsum("sb,sbv->bv", weights, values), weights.t()
def t(f, n):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3
torch.manual_seed(0)
new = AdditiveAttention(256, 512, 256); old = Old(256, 512, 256); old.load_state_dict(new.state_dict())
for name, S, B, grad in (("generate, beam 5 x 64 sentences", 40, 320, False), ("generate, beam 5 x 1", 40, 5, False),
                         ("training step", 30, 32, True)):
    keys = torch.randn(S, B, 256, requires_grad=grad); vals = torch.randn(S, B, 512, requires_grad=grad)
    q = torch.randn(B, 256, requires_grad=grad)
    def run(m):
        with torch.set_grad_enabled(grad):
            c, w = m(q, keys, vals)
            if grad: c.sum().backward()
    ra, rb = [], []
    for _ in range(5):
        ra.append(t(lambda: run(old), 20)); rb.append(t(lambda: run(new), 20))
    a, b = sorted(ra)[2], sorted(rb)[2]
    print(f"{name} (S={S}, B={B}{', fwd+bwd' if grad else ''}): tanh form {a:.3f} ms, sigmoid form {b:.3f} ms: {a / b:.2f}x")
with torch.no_grad():
    d = max((old(q, keys, vals)[0] - new(q, keys, vals)[0]).abs().max().item(), 0)
print("max |context difference| fp32:", d)
