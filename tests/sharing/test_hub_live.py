"""Opt-in: push to and reload from the real Hugging Face Hub (Xet transport, server-side rules).

Runs only when ``TH_EDIT_LIVE_HUB_TOKEN`` holds a write token and ``TH_EDIT_LIVE_HUB_REPO`` names a
scratch repo (e.g. ``me/th-edit-live-test``); the network guard then lets huggingface.co through.
"""

import os

import pytest
import torch
from tiny_models import input_ids, make_model

from th_edit import ChannelEditor

TOKEN, REPO = os.environ.get("TH_EDIT_LIVE_HUB_TOKEN"), os.environ.get("TH_EDIT_LIVE_HUB_REPO")
pytestmark = pytest.mark.skipif(not (TOKEN and REPO), reason="live Hub test: set TH_EDIT_LIVE_HUB_TOKEN and _REPO")


def test_live_push_plan_and_reapply(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    editor = ChannelEditor(make_model("gpt2"))
    editor.scale_component(1, 2, "ov", 0, 0.0)
    editor.push_plan_to_hub(REPO, token=TOKEN, private=True)
    again = ChannelEditor.from_plan(make_model("gpt2"), REPO, token=TOKEN)
    with torch.no_grad():
        assert torch.equal(again.model(input_ids()).logits, editor.model(input_ids()).logits)
