"""from_pretrained, edit, save_pretrained, reload with plain transformers.

    python examples/edit_and_save.py MODEL_DIR --out DIR

Removes the top OV component of one head, saves the edited model in native Hugging Face format (with its
edit plan and model card), reloads it with plain transformers and checks the logits are identical.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from th_edit import ChannelEditor


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="local model directory or Hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--head", type=int, default=0)
    args = p.parse_args(argv)

    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    editor = ChannelEditor(model, tokenizer=tokenizer)
    edit = editor.scale_component(args.layer, args.head, "ov", component=0, alpha=0.0)
    print("edit:", edit.describe())
    editor.save_pretrained(args.out)

    reloaded = AutoModelForCausalLM.from_pretrained(args.out, attn_implementation="eager").eval()
    ids = tokenizer("Alice bought milk and bread.", return_tensors="pt").input_ids
    with torch.no_grad():
        same = torch.equal(model(ids).logits, reloaded(ids).logits)
    print("reloaded with plain transformers, identical logits:", same)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
