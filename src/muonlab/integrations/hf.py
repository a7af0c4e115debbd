"""Hugging Face ``transformers``: the Trainer with Muon, and small random models for routing reports.

Three ways to train with a ``transformers.Trainer`` (see docs/trainers.md):

1. ``MuonTrainer(model=..., args=..., muon_kwargs={"lr": 0.02})``: a Trainer whose optimizer is
   :class:`muonlab.Muon` routed on the real model, and whose logs carry both groups' learning rates.
2. ``Trainer(..., optimizer_cls_and_kwargs=muon_optimizer(args, lr=0.02), callbacks=[LogGroupLRs()])``:
   the same optimizer through Trainer's factory hook, for Trainer subclasses you cannot change.
3. ``Trainer(..., optimizers=(Muon(model), None))``: your own Muon; Trainer adds its scheduler.

What comes from ``TrainingArguments`` (``muon_optimizer``): ``learning_rate`` -> the AdamW groups'
lr; ``adam_beta1``/``adam_beta2``/``adam_epsilon`` -> AdamW's betas and eps; ``weight_decay`` ->
decoupled decay of the Muon group and of the AdamW 2-D+ tensors (embeddings, head), none on norms
and biases (Trainer's own convention). Muon's lr is its own (default 0.02): ``args.learning_rate``
is an AdamW-scale number (1e-5 .. 1e-3) that would stall Muon under ``adjust_lr_fn="original"``.
To reuse one lr for both, pass ``adjust_lr_fn="match_rms_adamw", lr=args.learning_rate`` (Moonlight).
The Trainer's scheduler scales every group by the same factor.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from . import INSTALL_HINT, build_optimizer, group_lrs

try:
    import transformers
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"muonlab.integrations.hf needs transformers: {INSTALL_HINT} ({exc})") from exc

from .. import Muon

# ---------------------------------------------------------------------- the Trainer


class MuonFactory:
    """What Trainer's ``optimizer_cls_and_kwargs`` hook accepts as a factory (transformers >= 5:
    ``optimizer_cls()(model, **kwargs)``): it routes the model Trainer trains, not Trainer's flat
    decay/no-decay groups, so embeddings and the head stay on AdamW."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> Muon:
        return build_optimizer(model, **kwargs)


def muon_optimizer(args: Any = None, **muon_kwargs: Any) -> tuple[type, dict[str, Any]]:
    """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``, with AdamW's lr, betas,
    eps and the weight decay taken from ``args`` (a ``TrainingArguments``) unless given here.

    ``muon_kwargs``: any :class:`muonlab.Muon` option (``lr`` is Muon's, default 0.02) and the
    routing options of :func:`muonlab.muon_param_groups` (``adamw``, ``muon``, ``head``, ``views``).
    """
    kwargs: dict[str, Any] = {}
    if args is not None:
        kwargs.update(adamw_lr=args.learning_rate, adamw_betas=(args.adam_beta1, args.adam_beta2),
                      adamw_eps=args.adam_epsilon, weight_decay=args.weight_decay)
    kwargs.update(muon_kwargs)
    if not has_factory_hook():  # pragma: no cover - depends on the transformers version
        raise RuntimeError(
            f"transformers {transformers.__version__}'s Trainer cannot call an optimizer factory (it would "
            "pass its flat parameter groups to Muon); use MuonTrainer or Trainer(optimizers=(muonlab.Muon(model), None))"
        )
    return MuonFactory, kwargs


def has_factory_hook() -> bool:
    """Whether Trainer's ``optimizer_cls_and_kwargs`` accepts a factory called with the model."""
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:
        return False
    return bool(is_optimizer_factory(MuonFactory))


class LogGroupLRs(TrainerCallback):
    """Adds ``learning_rate_muon`` and ``learning_rate_adamw`` to each log line (Trainer's own
    ``learning_rate`` is the first group's only). Loggers that run after this callback see them, and
    so does ``trainer.state.log_history`` (saved with every checkpoint); :class:`MuonTrainer` adds
    them before any logger runs."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, optimizer: Any = None,
               **kwargs: Any) -> None:
        if not logs or "learning_rate" not in logs or optimizer is None:
            return
        extra = {f"learning_rate_{alg}": lr for alg, lr in group_lrs(optimizer, logs["learning_rate"]).items()}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("learning_rate") == logs["learning_rate"]:
            state.log_history[-1].update(extra)


class MuonTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with :class:`muonlab.Muon` (see :func:`muon_optimizer`
    for what comes from ``args``) and logs every algorithm's learning rate.

    Args:
        muon_kwargs: Muon and routing options, e.g. ``{"lr": 0.02, "views": {...}}``.
        everything else: as ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, muon_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any):
        custom = kwargs.get("optimizer_cls_and_kwargs") is not None or any(
            o is not None for o in kwargs.get("optimizers", (None, None)))
        super().__init__(*args, **kwargs)
        self._muon_kwargs = dict(muon_kwargs or {})
        if custom and muon_kwargs:
            raise ValueError("MuonTrainer: pass muon_kwargs or your own optimizer, not both")
        self._own_optimizer = not custom

    def create_optimizer(self, model: Optional[nn.Module] = None) -> Any:
        if self.optimizer is None and self._own_optimizer:
            factory, kwargs = muon_optimizer(self.args, **self._muon_kwargs)
            self.optimizer = factory()(self.model if model is None else model, **kwargs)
        return super().create_optimizer(model)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "learning_rate" in logs and self.optimizer is not None:
            logs.update({f"learning_rate_{alg}": lr for alg, lr in group_lrs(self.optimizer, logs["learning_rate"]).items()})
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------- small random models
# Small sizes for every config field name the common architectures use; only fields the
# architecture's config has are set (AutoConfig.for_model raises on none of them).
SMALL_SIZES: dict[str, Any] = {
    # decoder LMs (Llama, Mistral, Qwen, Gemma, Mixtral, Qwen-MoE, DeepSeek)
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_local_experts": 4,
    "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    # GPT-2 family
    "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "n_inner": 128,
    # T5 / encoder-decoders
    "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
    "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    # vision
    "image_size": 32, "patch_size": 8,
    # Mamba
    "state_size": 8,
}


def small_config(arch: str, overrides: Optional[dict[str, Any]] = None) -> Any:
    """``AutoConfig.for_model(arch)`` with :data:`SMALL_SIZES` where the config has such a field,
    then ``overrides`` (e.g. a config.json's contents) on top. Nothing is downloaded."""
    from transformers import AutoConfig

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if arch not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(arch, list(CONFIG_MAPPING_NAMES), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown architecture {arch!r} in transformers {transformers.__version__} "
                         f"(a config model_type such as llama, gpt2, mixtral{hint})")
    default = AutoConfig.for_model(arch)
    fields = default.to_dict()
    # only plain integer fields the config really has (not properties such as Falcon's head_dim, not
    # per-stage lists such as Swin's num_heads); an unset num_key_value_heads stays unset (= MHA)
    sizes = {k: v for k, v in SMALL_SIZES.items()
             if isinstance(fields.get(k), int) and not isinstance(fields.get(k), bool)}
    if "qk_rope_head_dim" in fields:  # MLA: head_dim is the rotary part, derived from qk_rope_head_dim
        sizes.pop("head_dim", None)
    merged = {**sizes, **(overrides or {})}
    vocab = merged.get("vocab_size")
    if isinstance(vocab, int):  # special token ids of the real vocabulary would index past the small one
        for key, value in fields.items():
            if key.endswith("token_id") and key not in merged and isinstance(value, int) and value >= vocab:
                merged[key] = vocab - 1
    return AutoConfig.for_model(arch, **merged)


TASKS = ("auto", "causal-lm", "seq2seq", "masked-lm", "image-classification", "base")


def model_class(config: Any, task: str = "auto") -> Any:
    """The Auto class for ``task``; ``"auto"``: seq2seq, then masked LM (encoders), causal LM,
    image classification, else the base model."""
    from transformers import models

    auto = models.auto.modeling_auto
    by_task = {
        "seq2seq": (auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "AutoModelForSeq2SeqLM"),
        "masked-lm": (auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, "AutoModelForMaskedLM"),
        "causal-lm": (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM"),
        "image-classification": (auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, "AutoModelForImageClassification"),
    }
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {list(TASKS)}")
    order = ["seq2seq", "masked-lm", "causal-lm", "image-classification"] if task == "auto" else [task]
    for t in order if task != "base" else []:
        names, cls = by_task[t]
        if config.model_type in names:
            return getattr(transformers, cls)
        if task != "auto":
            raise ValueError(f"{config.model_type} has no {t} model in transformers {transformers.__version__}")
    return transformers.AutoModel


def build_model(arch: Optional[str] = None, overrides: Optional[dict[str, Any]] = None, task: str = "auto",
                device: Union[str, None] = None, seed: int = 0) -> nn.Module:
    """A small random ``transformers`` model of ``arch`` (see :func:`small_config`), built offline.

    ``device="meta"`` builds shapes only (no memory, any size: routing needs no values).
    ``overrides`` may be a full config.json (its ``model_type`` then names the architecture).
    """
    import torch

    overrides = dict(overrides or {})
    model_type = overrides.pop("model_type", None)
    arch = arch or model_type
    if not arch:
        raise ValueError("name an architecture (--arch llama) or give a config with a 'model_type'")
    for key in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        overrides.pop(key, None)
    config = small_config(arch, overrides)
    cls = model_class(config, task)
    torch.manual_seed(seed)
    if device is None:
        return cls.from_config(config)
    with torch.device(device):
        return cls.from_config(config)


def load_overrides(path: Union[str, Path]) -> dict[str, Any]:
    """A config.json (a full one from a model repository, or a few fields) as a dict."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields, got {type(data).__name__}")
    return data
