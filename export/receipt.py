"""What every system's fidelity receipt shares: statistics of next-token logits, engine against reference.

A system's receipt (its ``export.py``) runs the PyTorch reference and the exported engine on
the same inputs and records how far the engine drifts: next-token distributions teacher-forced
on the reference's own answer (:func:`logit_stats`), the share of greedy runs whose text is
identical, and the IoU of the engine's masks against the reference's.
"""

from __future__ import annotations

import torch


def logit_stats(reference: list[torch.Tensor], engine: list[torch.Tensor]) -> dict[str, float]:
    """Next-token distributions of the reference and the engine, step for step (each [steps, V], compared
    over the shorter): max and mean absolute logit difference, mean and max KL(reference || engine), top-1
    agreement, the number of steps compared ({} when none)."""
    diffs, kls, agree = [], [], []
    for ref, eng in zip(reference, engine):
        steps = min(len(ref), len(eng))
        if not steps:
            continue
        ref, eng = ref[:steps].double(), eng[:steps].double()
        diffs.append((ref - eng).abs())
        log_p, log_q = ref.log_softmax(-1), eng.log_softmax(-1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
        agree.append(ref.argmax(-1) == eng.argmax(-1))
    if not diffs:
        return {}
    diff, kl, top1 = torch.cat([d.flatten() for d in diffs]), torch.cat(kls), torch.cat(agree)
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float(top1.double().mean()),
            "steps": int(top1.numel())}
