"""Issue 13, Medium: an edit the model's dtype cannot represent (alpha=1.0001 in bf16/fp16) is reported: a
warning, and the edit is flagged ``partial`` in the log, the saved plan and the model card."""

import logging

import pytest
import torch
from tiny_models import make_model

from th_edit import ChannelEditor
from th_edit.edits.plan import EditPlan


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiny_alpha_change_in_half_precision_is_flagged_partial(dtype, caplog, tmp_path):
    editor = ChannelEditor(make_model("llama", dtype=dtype))
    with caplog.at_level(logging.WARNING, logger="th_edit"):
        edit = editor.scale_component(1, 0, "ov", 0, 1.0001)
    assert edit.partial and editor.log.partial_edits == [edit]
    assert "lost to rounding" in caplog.text and "float32" in caplog.text
    editor.save_plan(tmp_path / "plan")
    assert EditPlan.load(tmp_path / "plan").edits[0].partial
    assert "partial" in str(editor.model_card())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_representable_edits_are_not_flagged(dtype, caplog):
    editor = ChannelEditor(make_model("llama", dtype=dtype))
    with caplog.at_level(logging.WARNING, logger="th_edit"):
        edit = editor.scale_component(1, 0, "ov", 0, 0.0)
        small = editor.scale_component(2, 1, "qk", 0, 1.0001 if dtype == torch.float32 else 2.0)
    assert not edit.partial and not small.partial and not editor.log.partial_edits
    assert "lost to rounding" not in caplog.text
