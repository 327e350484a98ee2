"""Quickstart: load a causal LM, look at one head's OV circuit, remove a component, undo, save a plan.

Runs as written on a tiny random GPT-2 (no download). Pass a local model directory to use a real one:
    python examples/quickstart.py [MODEL_DIR] [--out DIR]
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, GPT2Config

from th_edit import ChannelEditor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="local model directory (default: a tiny random GPT-2)")
    parser.add_argument("--out", default=None, help="where to write the edit plan (default: a temp dir)")
    args = parser.parse_args(argv)

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        torch.manual_seed(0)
        config = GPT2Config(n_layer=4, n_head=4, n_embd=64, vocab_size=256, bos_token_id=0, eos_token_id=0)
        model = AutoModelForCausalLM.from_config(config).eval()
    editor = ChannelEditor(model)
    print(editor)

    U, S, V = editor.svd(layer=2, head=1, circuit="ov")
    print("top OV singular values of head 2.1:", [round(s, 3) for s in S[:4].tolist()])

    ids = torch.arange(12)[None] % model.config.vocab_size
    with torch.no_grad():
        before = model(ids).logits
    edit = editor.scale_component(layer=2, head=1, circuit="ov", component=0, alpha=0.0)
    with torch.no_grad():
        after = model(ids).logits
    print(f"removed component 0 of layer 2 head 1 (s={edit.singular_values[0]:.3f}); "
          f"max logit change {(after - before).abs().max():.4f}")

    out = args.out or tempfile.mkdtemp(prefix="th_edit_plan_")
    editor.save_plan(out)
    print("edit plan saved to", out)

    editor.undo()
    with torch.no_grad():
        restored = model(ids).logits
    print("undo restores the logits bit for bit:", torch.equal(restored, before))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
