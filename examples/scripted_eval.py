"""Scripted Laundry List evaluation, single- or multi-process.

    python examples/scripted_eval.py --model DIR --out results.json
    accelerate launch --multi_gpu --num_processes 2 examples/scripted_eval.py --model DIR --out results.json

(On a machine without GPUs the processes run on CPU and talk over gloo.)

Loads a saved model (any local directory with a tokenizer; the bundled default model without --model),
optionally applies an edit plan, evaluates a seeded Laundry List test split and writes accuracy by
list length plus the per-example records as JSON. Under ``accelerate launch`` every process evaluates
its share of the batches, the results are gathered, and only the main process writes.
"""

import argparse
import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from th_edit import ChannelEditor
from th_edit.data import laundry_list
from th_edit.evaluate import evaluate
from th_edit.utils.distributed import is_main_process


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local model directory (default: the bundled SmolLM2)")
    p.add_argument("--plan", help="edit plan to apply first (directory or Hub repo id)")
    p.add_argument("--lengths", type=int, nargs="+", default=[3, 5, 8])
    p.add_argument("--n", type=int, default=20, help="examples per length (all splits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--save-to", help="also save the (edited) model here (main process only)")
    args = p.parse_args(argv)

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager").eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        from th_edit.models import load_default_model

        model, tokenizer = load_default_model()
    editor = ChannelEditor.from_plan(model, args.plan) if args.plan else ChannelEditor(model)
    data = laundry_list(tokenizer, lengths=args.lengths, n_per_length=args.n, seed=args.seed)
    result = evaluate(model, tokenizer, data["test"], batch_size=args.batch_size)
    if args.save_to:
        editor.save_pretrained(args.save_to, tokenizer=tokenizer)
    if is_main_process():
        with open(args.out, "w") as f:
            json.dump({"accuracy_by_length": result.accuracy_by_length(), "processes": result.meta["processes"],
                       "records": result.records.to_dict("records")}, f, indent=1)
        print(result.by_length().round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
