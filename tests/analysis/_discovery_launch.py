"""Run by tests/analysis/test_discovery_distributed.py, alone or under ``accelerate launch``: channel and circuit
discovery on a tiny model; the main process writes the causal scores and the circuit to argv[1]."""

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tiny_models import laundry_model  # noqa: E402

from th_edit import ChannelEditor  # noqa: E402
from th_edit.tasks.data import laundry_list  # noqa: E402
from th_edit.utils.distributed import is_main_process, process_rank_and_count  # noqa: E402


def _counting(module, name: str, counts: dict[str, int]):
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return real(*args, **kwargs)
    setattr(module, name, wrapped)


def main(out: str) -> None:
    import th_edit.analysis.circuit_discovery as circuit_mod
    import th_edit.analysis.discovery as discovery_mod

    counts: dict[str, int] = {}
    _counting(discovery_mod, "_inhibition_of", counts)
    _counting(circuit_mod, "_effect", counts)
    model, tok = laundry_model("llama", seed=11, num_hidden_layers=4)
    editor = ChannelEditor(model, tokenizer=tok)
    data = laundry_list(tok, lengths=[3, 5], n_per_length=24, seed=0)
    found = editor.find_channels(data["train"], n_movers=2, n_inhibition=5, n_control=3, n_duplicate=3,
                                 n_prompts=8, batch_size=4, progress=False)
    circuit = editor.find_circuit(data["train"], n_prompts=12, batch_size=4, z_min=1.0, t_min=1.0,
                                  max_candidates=3, min_gain=0.0, progress=False)
    rank, world = process_rank_and_count()
    Path(f"{out}.rank{rank}").write_text(json.dumps(counts))  # how many measurements this process made
    if is_main_process():
        Path(out).write_text(json.dumps({
            "world": process_rank_and_count()[1],
            "channels": found.channels[["kind", "sender_layer", "sender_head", "sender_component", "receiver_layer",
                                        "receiver_head", "inhibition_score"]].to_dict("records"),
            "circuit": circuit.to_dict(),
        }, default=float))


if __name__ == "__main__":
    os.environ.setdefault("TH_EDIT_DISABLE_PROGRESS", "1")
    main(sys.argv[1])
