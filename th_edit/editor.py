"""ChannelEditor: the facade that holds a model, its attention layout and its edit log.

Every method hands its work down: circuits and SVDs to :mod:`th_edit.core.circuits`, edits to
:mod:`th_edit.edits`, the channel map and discovery to :mod:`th_edit.analysis`, plans, checkpoints and the
Hub to :mod:`th_edit.sharing`. Circuits are folded by default (see :mod:`th_edit.core.circuits`); edits
write only the edited head's ``W_O[h]`` (OV) or ``W_Q[h]`` (QK) and undo bit for bit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Sequence, Union

import torch
from torch import nn

from .analysis import channel_map as channel_maps
from .analysis import circuit_discovery, discovery, edit_search, weights_only
from .analysis.channel_stream import ChannelMap
from .core import circuits
from .core.architectures import ArchSpec
from .core.checkpoint_layout import CheckpointLayout
from .core.circuits import MODES, HeadWeights, SVDResult, check_circuit
from .core.layout import AttentionLayout
from .edits import fit, steering
from .edits.plan import Edit, EditPlan
from .edits.scale import EditLog, head_fingerprint, make_edit
from .errors import AnalysisOnlyError, InvalidArgumentError
from .sharing import adapters, checkpoints, lora
from .sharing.cards import CardData, model_card
from .tasks.data import Rows
from .tasks.provenance import data_provenance

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo, ModelCard

__all__ = ["ChannelEditor", "WeightsOnlyEditor", "channel_map_from_checkpoint"]

logger = logging.getLogger(__name__)

#: where a computation runs (``None``: where the weights are)
Device = Union[torch.device, str, None]


class ChannelEditor:
    """Read, decompose and rescale the attention circuits of a transformers causal LM in place.

    Args:
        model: a causal LM whose ``config.model_type`` is in :data:`th_edit.ARCHITECTURES`; it may be
            dispatched with accelerate's ``device_map``.
        spec: an :class:`ArchSpec` overriding the table (for an architecture th_edit does not know).
        folded: default for every ``folded=`` argument: fold the input norm into circuits (True) or not.
        tokenizer: used by discovery and fitting, saved and pushed with the model.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=100))
        >>> editor = ChannelEditor(model)
        >>> U, S, V = editor.svd(layer=1, head=2, circuit="ov")
        >>> U.shape, S.shape
        (torch.Size([64, 16]), torch.Size([16]))
        >>> edit = editor.scale_component(layer=1, head=2, circuit="ov", component=0, alpha=0.0)
        >>> editor.undo() is edit
        True
    """

    def __init__(self, model: nn.Module, *, spec: ArchSpec | None = None, folded: bool = True, tokenizer: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layout = AttentionLayout(model, spec)
        self.folded = bool(folded)
        self.log = EditLog(self.layout)
        #: channel evidence and before/after evaluation for the model card
        self.card = CardData()
        #: provenance records of fits and searches (``"fit_config"``, ``"data"``: the data recipe and prompt keys,
        #: :func:`th_edit.tasks.provenance.data_provenance`), saved in plans while their edits are applied
        self._fits: list[tuple[list[Edit], dict[str, Any]]] = []

    # ----- geometry and state -------------------------------------------------------------------
    n_layers = property(lambda self: self.layout.n_layers, doc="number of blocks L")
    n_heads = property(lambda self: self.layout.n_heads, doc="query heads per layer H")
    n_kv_heads = property(lambda self: self.layout.n_kv_heads, doc="key/value heads per layer K")
    d_model = property(lambda self: self.layout.d_model, doc="residual width d")
    d_head = property(lambda self: self.layout.d_head, doc="head size d_h")
    edits = property(lambda self: self.log.edits, doc="edits currently applied, oldest first")
    evidence = property(lambda self: self.card.evidence, lambda self, v: setattr(self.card, "evidence", list(v)))
    evaluation = property(lambda self: self.card.evaluation, lambda self, v: setattr(self.card, "evaluation", v))

    def __repr__(self) -> str:
        return (f"ChannelEditor({self.model.config.model_type}, layers={self.n_layers}, heads={self.n_heads}, "
                f"kv_heads={self.n_kv_heads}, d_model={self.d_model}, d_head={self.d_head}, edits={len(self.log)})")

    def _folded(self, folded: bool | None) -> bool:
        return self.folded if folded is None else bool(folded)

    # ----- circuits -----------------------------------------------------------------------------
    def head_weights(self, layer: int, head: int) -> HeadWeights:
        """Float32 copies of one head's attention parameters (GQA resolved)."""
        return circuits.head_weights(self.layout, layer, head)

    def circuit_factors(self, layer: int, head: int, circuit: str = "ov", *,
                        folded: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Thin factors ``(A, B)``, ``circuit = A @ B.T``, both ``[d, d_h]`` (see :func:`circuits.circuit_factors`)."""
        return circuits.circuit_factors(self.layout, layer, head, circuit, folded=self._folded(folded))

    def circuit_matrix(self, layer: int, head: int, circuit: str = "ov", *, folded: bool | None = None) -> torch.Tensor:
        """The dense ``[d, d]`` circuit (for inspection and tests, not for bulk work)."""
        A, B = self.circuit_factors(layer, head, circuit, folded=folded)
        return A @ B.T

    def svd(self, layer: int, head: int, circuit: str = "ov", *, folded: bool | None = None) -> SVDResult:
        """Factored SVD ``U, S, V`` of one head's circuit (float32, deterministic signs)."""
        return circuits.svd(self.layout, layer, head, circuit, folded=self._folded(folded))

    def svd_all(self, circuit: str = "ov", *, folded: bool | None = None, layers: Sequence[int] | None = None,
                device: Device = None) -> SVDResult:
        """Batched SVD of every head of ``layers``: ``U, V [n_layers, H, d, d_h]``, ``S [n_layers, H, d_h]``."""
        return circuits.svd_all(self.layout, circuit, folded=self._folded(folded), layers=layers, device=device)

    def stacked_factors(self, circuit: str = "ov", *, folded: bool | None = None, layers: Sequence[int] | None = None,
                        device: Device = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of every head of ``layers`` stacked: ``A, B [n_layers, H, d, d_h]`` float32."""
        return circuits.stacked_factors(self.layout, circuit, folded=self._folded(folded), layers=layers, device=device)

    # ----- composition --------------------------------------------------------------------------
    def channel_map(self, modes: Sequence[str] = MODES, *, config: channel_maps.ChannelMapConfig | None = None,
                    folded: bool | None = None, senders: Sequence[tuple[int, int]] | None = None,
                    receivers: Sequence[tuple[int, int]] | None = None, layers: Sequence[int] | None = None,
                    device: Device = None, progress: bool = True, **settings: Any) -> ChannelMap:
        """Composition of every sender head's OV components into every later receiver head.

        ``settings`` (``memory_limit_mb``, ``keep_top``, ``baseline_samples``, ``seed``) override fields of
        ``config`` (a :class:`~th_edit.analysis.channel_map.ChannelMapConfig`). See
        :func:`th_edit.analysis.channel_map.channel_map`.

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> editor = ChannelEditor(GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=50)))
        >>> editor.channel_map(progress=False, baseline_samples=4).head_scores("q").shape
        torch.Size([3, 4, 3, 4])
        """
        cfg = channel_maps.ChannelMapConfig.merged(config, modes=tuple(modes), **settings)
        return channel_maps.channel_map(self.layout, cfg, folded=self._folded(folded), senders=senders,
                                       receivers=receivers, layers=layers, device=device, progress=progress)

    def composition(self, sender: tuple[int, int], receiver: tuple[int, int], mode: str = "q", *,
                    folded: bool | None = None) -> dict[str, Any]:
        """One sender head into one later receiver head, all levels (see :func:`th_edit.analysis.channel_map.head_composition`)."""
        return channel_maps.head_composition(self.layout, sender, receiver, mode, folded=self._folded(folded))

    # ----- editing ------------------------------------------------------------------------------
    def scale_component(self, layer: int, head: int, circuit: str = "ov", component: int | Sequence[int] = 0,
                        alpha: float = 0.0, *, folded: bool | None = None) -> Edit:
        """Rescale singular component(s) of one head's circuit by ``alpha``, in place, and log the edit.

        The circuit changes by ``(alpha - 1) * sum_i s_i u_i v_i^T``, written into ``W_O[h]`` (OV) or
        ``W_Q[h]`` (QK) only; ``alpha=1`` is an exact no-op, ``alpha=0`` removes the components. Bad
        arguments raise :class:`InvalidArgumentError` and leave the model untouched.
        """
        edit = make_edit(self.layout, layer, head, circuit, component, alpha, folded=self._folded(folded))
        self.log.apply(edit)
        logger.info("scaled %s component(s) %s of layer %d head %d by %g", circuit, list(edit.components), layer, head, alpha)
        return edit

    def apply_edit(self, edit: Edit) -> None:
        """Write a precomputed :class:`Edit`'s factors into the model (used by plans) and log it."""
        self.log.apply(edit)

    def undo(self) -> Edit:
        """Revert the most recent edit bit for bit and return it."""
        return self.log.undo()

    def reset(self) -> list[Edit]:
        """Revert every edit (newest first); the model is then bit-identical to the start."""
        return self.log.reset()

    def steer(self, layer: int, head: int, circuit: str = "ov", *, component: int | Sequence[int] = 0,
              alpha: float = 1.0, add: float | Sequence[float] = 0.0, positions: Any = None,
              folded: bool | None = None) -> ContextManager[Any]:
        """Context manager rescaling a head's output along OV component(s) at run time (no weight change);
        at every position it equals ``scale_component(layer, head, "ov", component, alpha)``. See
        :mod:`th_edit.edits.steering`."""
        if check_circuit(circuit) != "ov":
            raise InvalidArgumentError(
                f"circuit={circuit!r}: steering rescales what a head writes, so it needs 'ov'; "
                "use scale_component(..., circuit='qk', ...) to rescale what it reads."
            )
        return steering.steer(self.layout, layer, head, component=component, alpha=alpha, add=add,
                              positions=positions, folded=self._folded(folded))

    # ----- discovery and search -----------------------------------------------------------------
    def find_channels(self, dataset: Rows, config: discovery.DiscoveryConfig | None = None, *, tokenizer: Any = None,
                      channel_map: ChannelMap | None = None, progress: bool = True,
                      **settings: Any) -> discovery.ChannelFindings:
        """Ranked inhibition and duplicate-detection channels with weight-based and causal evidence; see
        :func:`th_edit.analysis.discovery.find_channels` (``settings`` override ``config`` fields)."""
        cfg = discovery.DiscoveryConfig.merged(config, **settings)
        return discovery.find_channels(self, self._tokenizer(tokenizer), dataset, cfg, channel_map=channel_map,
                                       progress=progress)

    def find_circuit(self, dataset: Rows, config: circuit_discovery.CircuitConfig | None = None, *, tokenizer: Any = None,
                     channel_map=None, measurements: dict | None = None, progress: bool = True,
                     **settings: Any) -> circuit_discovery.Circuit:
        """The circuit that writes the task's answer, found backward from the answer through composition
        steps confirmed causally; see :func:`th_edit.analysis.circuit_discovery.find_circuit`. Pass train or dev
        prompts, never test."""
        return circuit_discovery.find_circuit(self, self._tokenizer(tokenizer), dataset, config,
                                              channel_map=channel_map, measurements=measurements,
                                              progress=progress, **settings)

    def search_edit(self, dev: Rows, test: Rows, findings: discovery.ChannelFindings,
                    config: edit_search.EditSearchConfig | None = None, *, tokenizer: Any = None,
                    candidates: Sequence[tuple[int, int, str, int]] | None = None, progress: bool = True,
                    train: Rows | None = None,
                    **settings: Any) -> edit_search.EditSearch:
        """Grid-search single-component rescalings on ``dev``, report ``test``; the chosen edits stay
        applied and the card records the evidence. ``train``: the prompts ``findings`` came from, recorded
        with ``dev`` in exported plans so later evaluations can refuse them. See
        :func:`th_edit.analysis.edit_search.search_edit`."""
        cfg = edit_search.EditSearchConfig.merged(config, **settings)
        n_before = len(self.log.edits)
        result = edit_search.search_edit(self, self._tokenizer(tokenizer), dev, test, findings, cfg,
                                         candidates=candidates, progress=progress)
        self._fits.append((self.log.edits[n_before:], {"data": data_provenance(train, dev)}))
        self.card = CardData(evidence=result.evidence, evaluation=result.evaluation)
        return result

    def fit_edit(self, train: Rows, dev: Rows, *, heads: Any = None, circuits: Sequence[str] | None = None,
                 budget: int | None = None, test: Rows | None = None,
                 findings: discovery.ChannelFindings | circuit_discovery.Circuit | None = None,
                 config: fit.FitConfig | None = None, tokenizer: Any = None, **settings: Any) -> fit.FitResult:
        """Learn one scale per singular component of the chosen heads' circuits on ``train``, keep at most
        ``budget`` components, choose on ``dev`` and apply the result as ordinary edits (``test``, when given,
        is evaluated once for the report). ``heads`` (default ``"all"``): ``"all"``, ``"upper"``, ``"discovered"``
        or ``"circuit"`` (the heads of :meth:`find_circuit` on ``train``, or of ``findings``), ``"roles"`` (the
        heads of :meth:`find_channels`: the paper's three roles) or ``(layer, head)`` pairs. See
        :func:`th_edit.edits.fit.fit_edit`; ``settings`` override :class:`~th_edit.edits.fit.FitConfig` fields.

        >>> result = editor.fit_edit(data["train"], data["dev"], heads="discovered", budget=256)  # doctest: +SKIP
        """
        tokenizer = self._tokenizer(tokenizer)
        given = {"heads": heads, "circuits": None if circuits is None else tuple(circuits), "budget": budget}
        cfg = (config or fit.FitConfig()).with_overrides(**{k: v for k, v in given.items() if v is not None}, **settings)
        if cfg.heads == "roles" and findings is None:
            findings = self.find_channels(train, progress=cfg.progress)
        elif cfg.heads in ("circuit", "discovered") and findings is None:
            findings = self.find_circuit(train, progress=cfg.progress)
        result = fit.fit_edit(self.layout, self.log, tokenizer, train, dev, cfg, test=test, folded=self.folded,
                              heads=self.resolve_heads(cfg.heads, findings=findings))
        record = {"fit_config": cfg.to_dict(), "data": data_provenance(train, dev)}
        if isinstance(findings, circuit_discovery.Circuit) and cfg.heads in ("circuit", "discovered"):
            record["circuit"] = findings.to_dict()  # the heads' evidence travels with the plan (JSON)
        self._fits.append((result.edits, record))
        result.plan = self.export_plan()
        self.card = CardData(evidence=findings.evidence() if findings is not None else [], evaluation=result.evaluation)
        return result

    def resolve_heads(self, heads: Any = "all", *,
                      findings: discovery.ChannelFindings | circuit_discovery.Circuit | None = None) -> list[tuple[int, int]]:
        """The ``(layer, head)`` pairs a head spec names (``"all"``, ``"upper"``, ``"discovered"``, ``"circuit"``
        or ``"roles"`` with ``findings``, or pairs); see :func:`th_edit.edits.fit.resolve_heads`."""
        return fit.resolve_heads(self.layout, heads, findings)

    def _tokenizer(self, tokenizer: Any) -> Any:
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise InvalidArgumentError("this needs a tokenizer: pass tokenizer=... here or to ChannelEditor(model, tokenizer=...).")
        return tokenizer

    # ----- plans, checkpoints, Hub --------------------------------------------------------------
    def head_fingerprint(self, layer: int, head: int) -> str:
        """SHA-256 of one head's weights as float32 bytes (identifies a plan's base model)."""
        return head_fingerprint(self.layout, layer, head)

    def export_plan(self) -> EditPlan:
        """The applied edits, in order, with the base model's identity and, while the edits of a fit or search
        are applied, how they were made (``plan.provenance["fit_config"]`` and ``["data"]``)."""
        return checkpoints.export_plan(self.model, self.log, provenance=self._provenance())

    def _provenance(self) -> dict[str, Any]:
        applied = {id(e) for e in self.log.edits}
        record: dict[str, Any] = {}
        for edits, fit_record in self._fits:
            if edits and all(id(e) in applied for e in edits):
                record.update(fit_record)
        return record

    def save_plan(self, directory: str | os.PathLike) -> None:
        """Write :meth:`export_plan` to ``directory`` (JSON + safetensors, atomic; main process only)."""
        checkpoints.save_plan(self.export_plan(), directory)

    def verify_plan(self, plan: EditPlan) -> None:
        """Raise :class:`PlanMismatchError` unless ``plan`` was made on this model's current weights."""
        checkpoints.verify_plan(plan, self.layout)

    def apply_plan(self, plan: EditPlan | str | os.PathLike, *, verify: bool = True) -> list[Edit]:
        """Apply a plan (an :class:`EditPlan` or a directory); verified first, rolled back on failure."""
        return checkpoints.apply_plan(self.log, checkpoints.load_plan(plan) if not isinstance(plan, EditPlan) else plan,
                                      verify=verify)

    @classmethod
    def from_checkpoint(cls, source: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
                        cache_layers: int = 2, spec: ArchSpec | None = None, folded: bool = True,
                        revision: str | None = None, token: str | None = None) -> "WeightsOnlyEditor":
        """An analysis-only editor reading a safetensors checkpoint (a directory or a Hub id) without loading
        the model: ``svd``, ``svd_all``, ``circuit_factors``, ``composition`` and ``channel_map`` (in bounded
        memory) work and equal the loaded model's; editing methods raise :class:`AnalysisOnlyError`.
        For a Hub id only ``config.json``, the index and the shards holding attention weights are downloaded.
        ``device``: where layers are loaded and circuits computed; ``dtype``: cast on load (default as
        stored); ``cache_layers``: layers kept in memory. See :class:`~th_edit.core.checkpoint_layout.CheckpointLayout`.

        >>> editor = ChannelEditor.from_checkpoint("meta-llama/Meta-Llama-3-70B")  # doctest: +SKIP
        >>> cmap = editor.channel_map(memory_limit_mb=8192)                          # doctest: +SKIP
        """
        from .sharing.weights import checkpoint_directory

        directory = checkpoint_directory(source, revision=revision, token=token)
        layout = CheckpointLayout(directory, spec=spec, device=device, dtype=dtype, cache_layers=cache_layers)
        return WeightsOnlyEditor(layout, folded=folded)

    @classmethod
    def from_plan(cls, model: nn.Module, plan: EditPlan | str | os.PathLike, *, verify: bool = True,
                  revision: str | None = None, token: str | None = None, **kwargs: Any) -> "ChannelEditor":
        """A new editor on ``model`` with ``plan`` applied: an :class:`EditPlan`, a directory or a Hub repo id
        (only the plan's two files are downloaded; nothing is executed or unpickled).

        >>> editor = ChannelEditor.from_plan(base_model, "me/gpt2-laundry-plan")  # doctest: +SKIP
        """
        plan = checkpoints.load_plan(plan, revision=revision, token=token)
        editor = cls(model, **kwargs)
        editor.apply_plan(plan, verify=verify)
        return editor

    def model_card(self, repo_id: str | None = None) -> ModelCard:
        """The ``huggingface_hub.ModelCard`` that :meth:`save_pretrained` writes."""
        from .utils.devices import runtime_record

        return model_card(self.export_plan(), repo_id=repo_id, evidence=self.card.evidence, evaluation=self.card.evaluation,
                          runtime=runtime_record(self.model))

    def save_pretrained(self, directory: str | os.PathLike, *, tokenizer: Any = None, repo_id: str | None = None,
                        **save_kwargs: Any) -> Path:
        """Save the edited model in native Hugging Face format with tokenizer, model card and edit plan
        (see :func:`th_edit.sharing.checkpoints.save_pretrained`)."""
        return checkpoints.save_pretrained(self.model, directory, plan=self.export_plan(), card=self.card, repo_id=repo_id,
                                           tokenizer=tokenizer if tokenizer is not None else self.tokenizer, **save_kwargs)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None, tokenizer: Any = None,
                    commit_message: str = "Upload model edited with th_edit", **save_kwargs: Any) -> CommitInfo:
        """Save as :meth:`save_pretrained` does and upload to ``repo_id`` in one commit (``CommitInfo``)."""
        return checkpoints.push_to_hub(self.model, repo_id, plan=self.export_plan(), card=self.card, token=token,
                                       private=private, commit_message=commit_message,
                                       tokenizer=tokenizer if tokenizer is not None else self.tokenizer, **save_kwargs)

    def push_plan_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                         commit_message: str = "Upload th_edit edit plan") -> CommitInfo:
        """Upload the edit plan alone (JSON + safetensors, a few KB) with a card to ``repo_id``."""
        return checkpoints.push_plan(self.export_plan(), repo_id, token=token, private=private, commit_message=commit_message)

    # ----- PEFT LoRA adapters -------------------------------------------------------------------
    def save_adapter(self, directory: str | os.PathLike, *, edits: EditPlan | Sequence[Edit] | None = None,
                     layout: str = "compact", max_rank: int | None = None, **kwargs: Any) -> Path:
        """Write the applied edits (or ``edits``) as an exact peft LoRA adapter (plus th_edit's plan and a card);
        any peft user loads it with ``PeftModel.from_pretrained``. ``layout="uniform"`` gives every layer the
        same modules and rank (what text-generation-inference and LoRAX need); ``max_rank`` refuses, before
        writing, an adapter whose rank a server would refuse. See :func:`th_edit.sharing.adapters.save_adapter`."""
        return adapters.save_adapter(self.layout, directory, plan=self._adapter_plan(edits), card=self.card,
                                     adapter_layout=layout, max_rank=max_rank, **kwargs)

    def push_adapter_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                            edits: EditPlan | Sequence[Edit] | None = None, layout: str = "compact",
                            max_rank: int | None = None, **kwargs: Any) -> CommitInfo:
        """Save as :meth:`save_adapter` does and upload it to ``repo_id`` in one commit (``CommitInfo``)."""
        return adapters.push_adapter_to_hub(self.layout, repo_id, plan=self._adapter_plan(edits), card=self.card,
                                            token=token, private=private, adapter_layout=layout, max_rank=max_rank,
                                            **kwargs)

    def _adapter_plan(self, edits: EditPlan | Sequence[Edit] | None) -> EditPlan:
        return lora.plan_to_export(self.export_plan(), self.layout, edits)

    @classmethod
    def from_adapter(cls, model: nn.Module, source: str | os.PathLike, *, verify: bool = True,
                     revision: str | None = None, token: str | None = None, **kwargs: Any) -> "ChannelEditor":
        """A new editor on ``model`` with a th_edit LoRA adapter (directory or repo id) applied as exact,
        undoable edits; an adapter made on another base is refused (fingerprints). See
        :func:`th_edit.sharing.adapters.load_adapter_edits`."""
        editor = cls(model, **kwargs)
        plan = adapters.load_adapter_edits(editor.layout, source, verify=verify, revision=revision, token=token)
        # as from_plan: with verify, each edit's factors must equal the rescaling recomputed from the base
        # model's SVD (altered factors or alphas are refused); the LoRA tensors were checked against the plan
        editor.apply_plan(plan, verify=verify)
        return editor


class WeightsOnlyEditor(ChannelEditor):
    """Analysis from checkpoint files (made by :meth:`ChannelEditor.from_checkpoint`): no model is loaded.

    Reading methods work as on :class:`ChannelEditor` and return the same values; :meth:`channel_map`
    streams in bounded memory (:func:`th_edit.analysis.weights_only.bounded_channel_map`: the working set
    stays below ``max(memory_limit_mb, one layer's working set)`` plus the result). Editing, steering,
    discovery, fitting, plans and saving raise :class:`AnalysisOnlyError`. ``editor.layout.tensors_read``
    lists the tensors read so far.
    """

    def __init__(self, layout: CheckpointLayout, *, folded: bool = True) -> None:
        self.model = None
        self.tokenizer = None
        self.layout = layout
        self.folded = bool(folded)
        self.log = EditLog(layout)
        self.card = CardData()

    def __repr__(self) -> str:
        L = self.layout
        return (f"WeightsOnlyEditor({L.directory}, {L.config.model_type}, layers={self.n_layers}, heads={self.n_heads}, "
                f"kv_heads={self.n_kv_heads}, d_model={self.d_model}, d_head={self.d_head})")

    def channel_map(self, modes: Sequence[str] = MODES, *, config: channel_maps.ChannelMapConfig | None = None,
                    folded: bool | None = None, senders=None, receivers=None, layers=None, device=None,
                    progress: bool = True, **settings: Any):
        """The channel map, equal to the loaded model's, in bounded memory (see the class docstring);
        arguments as :meth:`ChannelEditor.channel_map`."""
        cfg = channel_maps.config_from(channel_maps.ChannelMapConfig, config, modes=tuple(modes), **settings)
        return weights_only.bounded_channel_map(self.layout, cfg, folded=self._folded(folded), senders=senders,
                                                receivers=receivers, layers=layers, device=device, progress=progress)


_NEEDS_MODEL = ("scale_component", "apply_edit", "undo", "reset", "steer", "find_channels", "search_edit", "fit_edit",
                "export_plan", "save_plan", "verify_plan", "apply_plan", "model_card", "save_pretrained", "push_to_hub",
                "push_plan_to_hub", "save_adapter", "push_adapter_to_hub")


def _analysis_only(name: str):
    def method(self, *args: Any, **kwargs: Any):
        raise AnalysisOnlyError(
            f"{name}() needs a loaded model, but this editor reads weights from {self.layout.directory} "
            "(weights-only analysis). Load it with ChannelEditor(AutoModelForCausalLM.from_pretrained(...)) to edit, "
            "steer, fit or save."
        )

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"Not available without a model: raises :class:`AnalysisOnlyError` (see ChannelEditor.{name})."
    return method


for _name in _NEEDS_MODEL:
    setattr(WeightsOnlyEditor, _name, _analysis_only(_name))


def channel_map_from_checkpoint(source: str | os.PathLike, modes: Sequence[str] = MODES, *, device=None,
                                dtype: torch.dtype | None = None, memory_limit_mb: float = 512.0,
                                revision: str | None = None, token: str | None = None, progress: bool = True,
                                **settings: Any):
    """The channel map of a safetensors checkpoint (directory or Hub id) without loading the model:
    ``ChannelEditor.from_checkpoint(source, ...).channel_map(modes, memory_limit_mb=..., ...)``.

    Memory: below ``max(memory_limit_mb, one layer's working set)`` plus the result (``4 * Ns * (d_h + 1) * Nr``
    bytes per mode); see :func:`th_edit.analysis.weights_only.bounded_channel_map`.
    """
    editor = ChannelEditor.from_checkpoint(source, device=device, dtype=dtype, revision=revision, token=token)
    return editor.channel_map(modes, memory_limit_mb=memory_limit_mb, progress=progress, device=device, **settings)
