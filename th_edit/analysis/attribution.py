"""Answer margins and their gradient with respect to every OV component's scale (attribution).

The *answer margin* of a prompt is the logit of its target item minus the mean logit of the other listed
items, at the final token. The *attribution* of OV component ``c`` of head ``(l, h)`` is the derivative of
the mean margin with respect to that component's log-scale at the unedited model,
``d margin / d log(alpha_c)`` at ``alpha_c = 1``: the first-order change of the answer when the component
is rescaled by ``exp(eps)``, so removing it changes the margin by about ``-attribution`` and scaling it
by ``exp(+-step)`` by about ``+-step * attribution``. One forward and one backward pass per batch give it
for every component of every head (the hooks of :class:`th_edit.edits.fit_hooks.ChannelFit`, nothing is
written into the model).

>>> # grads = component_attribution(editor, batches)   # [n_layers, n_heads, d_head]
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..edits.fit_hooks import ChannelFit, frozen_parameters
from ..tasks.batching import PromptBatch, input_device
from ..utils.progress import progress_bar
from .protocol import HeadEditor

__all__ = ["answer_margins", "component_attribution"]

logger = logging.getLogger(__name__)


def answer_margins(logits: torch.Tensor, pb: PromptBatch, width: int) -> torch.Tensor:
    """``[B]`` float32 (on ``logits``' device, differentiable): the answer's logit minus the mean logit of
    the other listed items at each prompt's final token. ``logits [B, T', V]`` may hold only the last
    ``T'`` of the ``width`` positions (``logits_to_keep``)."""
    offset = width - logits.shape[1]
    rows = torch.arange(len(pb), device=logits.device)
    final = logits[rows, (pb.last - offset).to(logits.device)].float()  # [B, V]
    out = []
    for b, (cands, t) in enumerate(zip(pb.candidates, pb.targets)):
        vals = final[b, torch.tensor(cands, device=logits.device)]
        out.append(vals[t] - torch.cat([vals[:t], vals[t + 1:]]).mean())
    return torch.stack(out)


def component_attribution(editor: HeadEditor, batches: Sequence[PromptBatch], *,
                          progress: bool = False) -> torch.Tensor:
    """``[n_layers, n_heads, d_head]`` float32 on the CPU: ``d mean margin / d log(alpha)`` of every OV
    component (index ``c`` as in ``editor.svd(l, h, "ov")``) over the prompts of ``batches``.

    The model's parameters are not written; it runs in eval mode, and its ``requires_grad`` flags and
    training mode are restored (:func:`~th_edit.edits.fit_hooks.frozen_parameters`).
    """
    L = editor.layout
    heads = [(layer, head) for layer in range(L.n_layers) for head in range(L.n_heads)]
    fit = ChannelFit(L, heads, ["ov"], editor.folded)
    theta = fit.theta.clone().requires_grad_(True)
    total = torch.zeros_like(theta)
    n = sum(len(pb) for pb in batches)
    device = input_device(editor.model)
    with frozen_parameters(editor.model), progress_bar(total=len(batches), desc="circuit: attribution",
                                                       enabled=progress) as bar:
        for pb in batches:
            with fit.hooks(theta):
                out = editor.model(input_ids=pb.input_ids.to(device), attention_mask=pb.attention_mask.to(device))
            margin = answer_margins(out.logits, pb, pb.input_ids.shape[1]).sum() / n
            (grad,) = torch.autograd.grad(margin, theta)
            total += grad.detach().cpu()
            bar.update(1)
    return total.view(L.n_layers, L.n_heads, -1)
