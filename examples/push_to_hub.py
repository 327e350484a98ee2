"""Push an edited model and its edit plan to the Hub, then re-apply the plan from the Hub.

    python examples/push_to_hub.py MODEL_DIR USER/NAME [--token TOKEN]

Pushes the full edited checkpoint to USER/NAME and the plan alone to USER/NAME-plan (each with a model
card), then loads the base model again and re-applies the plan by repo id, checking the logits match.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from th_edit import ChannelEditor


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("repo_id")
    p.add_argument("--token", default=None)
    args = p.parse_args(argv)

    load = lambda: AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager").eval()  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    editor = ChannelEditor(load(), tokenizer=tokenizer)
    editor.scale_component(1, 0, "ov", component=0, alpha=2.0)
    info = editor.push_to_hub(args.repo_id, token=args.token)
    print("model pushed:", info.commit_url)
    info = editor.push_plan_to_hub(args.repo_id + "-plan", token=args.token)
    print("plan pushed:", info.commit_url)

    again = ChannelEditor.from_plan(load(), args.repo_id + "-plan", token=args.token)
    ids = tokenizer("Alice bought milk and bread.", return_tensors="pt").input_ids
    with torch.no_grad():
        same = torch.equal(again.model(ids).logits, editor.model(ids).logits)
    print("plan re-applied from the Hub, identical logits:", same)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
