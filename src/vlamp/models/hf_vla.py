"""``model.name=hf-vlm``: a VLA on a real transformers VLM backbone.

PaliGemma's architecture (a SigLIP vision tower, a linear projector and a Gemma decoder), built
from a config with random init — sized by ``model.dim``/``depth``/``heads`` for the data, or read
from a local ``config.json`` (``model.hf_config``) whose weights the user may load from local
safetensors; never downloaded. vlamp's ACT-style head sits on it: the image tokens, the
instruction's word embeddings, a state token and ``chunk`` learned action queries go through the
decoder; the queries' last hidden states are projected to actions and trained with the L1 loss
on the real (unpadded) steps, as TinyVLA's ``act`` head is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlamp.models.config import ModelConfig, example_batch
from vlamp.models.hf import read_config, transformers_module
from vlamp.models.presets import VLA_PRESETS
from vlamp.models.tinyvla import ChunkL1Loss
from vlamp.precision.errors import VlampError


def vlm_config(config: ModelConfig, layers: dict[str, int] | None = None):
    """The PaliGemma config of an hf-vlm model: ``model.hf_config`` when given, a real-size
    preset's (``model.size``, :mod:`vlamp.models.presets`), else one sized by ``dim``, ``depth``
    (decoder layers), ``text_layers`` (vision layers) and ``heads``, for ``image_size`` images in
    patches of 8 pixels. ``layers`` overrides a preset's depths (``vision``, ``text``)."""
    T = transformers_module()
    if config.size in VLA_PRESETS:
        preset = VLA_PRESETS[config.size]
        vision = {**preset["vision"], "image_size": config.image_size}
        text = {**preset["text"], "max_position_embeddings": 1024}
        for key, n in (layers or {}).items():
            if key in ("vision", "text"):
                (vision if key == "vision" else text)["num_hidden_layers"] = n
        d, vocab = text["hidden_size"], text["vocab_size"]
        return T.PaliGemmaConfig(vision_config={**vision, "projection_dim": d}, text_config=text,
                                 vocab_size=vocab, image_token_index=vocab - 1, projection_dim=d,
                                 hidden_size=d)
    if config.hf_config:
        path = Path(config.hf_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise VlampError(f"model.hf_config {config.hf_config!r}: no config.json there")
        vlm = read_config(path, "model.hf_config")
        if not isinstance(vlm, T.PaliGemmaConfig):
            raise VlampError(f"model.hf_config {config.hf_config!r} is a {type(vlm).__name__}; "
                             f"hf-vlm builds on PaliGemmaConfig")
        return vlm
    d, heads = config.dim, config.heads
    vision = dict(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=config.text_layers,
                  num_attention_heads=heads, image_size=config.image_size, patch_size=8,
                  projection_dim=d)
    text = dict(vocab_size=config.vocab_size, hidden_size=d, intermediate_size=4 * d,
                num_hidden_layers=config.depth, num_attention_heads=heads, num_key_value_heads=1,
                head_dim=d // heads, max_position_embeddings=1024)
    return T.PaliGemmaConfig(vision_config=vision, text_config=text, vocab_size=config.vocab_size,
                             image_token_index=config.vocab_size - 1, projection_dim=d, hidden_size=d)


class HFVLA(nn.Module):
    """A VLA on PaliGemma's architecture with vlamp's chunk head; the same interface as
    :class:`~vlamp.models.tinyvla.TinyVLA` (``loss = model(batch)``, ``model.predict(...)``,
    ``model.example_batch(n)``).

    A real-size preset (``model.size=smolvla|pi0``) adds an action expert: a smaller Gemma
    decoder whose sequence is the backbone's last hidden states (projected to its width), then
    the action queries; the queries are read from its output instead.

    Args:
        config: The model config (``name="hf-vlm"``); ``vocab_size`` from the tokenizer.
        layers: Depths that replace a preset's (``vision``, ``text``, ``expert``): the shallow
            copies a memory probe measures (:mod:`vlamp.fit`).

    Raises:
        VlampError: Without transformers (``pip install "vlamp[hf]"``), with the flow head, or
            with a config that is not PaliGemma's.
    """

    def __init__(self, config: ModelConfig, layers: dict[str, int] | None = None) -> None:
        super().__init__()
        if config.head != "act":
            raise VlampError("model.name=hf-vlm has the act head only; use model.head=act")
        if config.vocab_size < 3:
            raise VlampError(f"HFVLA: vocab_size must be set from the tokenizer, got {config.vocab_size}")
        T = transformers_module()
        self.config = config
        self.backbone = (_pretrained(config) if config.hf_pretrained
                         else T.PaliGemmaModel(vlm_config(config, layers)))
        d = self.backbone.config.text_config.hidden_size
        self.state_proj = nn.Linear(config.state_dim, d)
        self.expert = self.expert_in = None
        if config.size in VLA_PRESETS:
            shape = {**VLA_PRESETS[config.size]["expert"], "vocab_size": 2,
                     "max_position_embeddings": 1024}
            if layers and "expert" in layers:
                shape["num_hidden_layers"] = layers["expert"]
            self.expert_in = nn.Linear(d, shape["hidden_size"])
            self.expert = T.GemmaModel(T.GemmaConfig(**shape))
            self.expert.embed_tokens = None  # it reads embeddings only: no table of its own
            d = shape["hidden_size"]
        self.action_queries = nn.Parameter(torch.randn(config.chunk, d) * 0.02)
        self.action_out = nn.Linear(d, config.action_dim)
        self.loss_fn = ChunkL1Loss()

    def example_batch(self, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """A random training batch of this model's shapes, on its device."""
        return example_batch(self.config, batch_size, self.action_queries.device, seed)

    def _queries(self, image: torch.Tensor, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) != (self.config.image_size,) * 2:
            raise VlampError(f"HFVLA: built for {self.config.image_size}px images, got "
                             f"{tuple(image.shape[-2:])}")
        pixels = self.backbone.get_image_features((image - 0.5) * 2.0)  # SigLIP's [-1, 1]
        words = self.backbone.get_input_embeddings()(tokens)
        b = image.shape[0]
        parts = [pixels.to(words.dtype), words, self.state_proj(state)[:, None].to(words.dtype)]
        queries = self.action_queries.expand(b, -1, -1)
        if self.expert is None:
            parts.append(queries.to(words.dtype))
        x = torch.cat(parts, dim=1)
        keep = torch.ones(b, x.shape[1], dtype=torch.long, device=x.device)
        keep[:, pixels.shape[1]: pixels.shape[1] + tokens.shape[1]] = (tokens != 0).long()
        # No KV cache: a policy never decodes, and a checkpointed layer's recomputation would
        # append its keys to the cache a second time.
        hidden = self.backbone.language_model(inputs_embeds=x, attention_mask=keep,
                                              use_cache=False).last_hidden_state
        if self.expert is not None:
            prefix = self.expert_in(hidden)
            x = torch.cat([prefix, queries.to(prefix.dtype)], dim=1)
            keep = torch.cat([keep, keep.new_ones(b, self.config.chunk)], dim=1)
            hidden = self.expert(inputs_embeds=x, attention_mask=keep, use_cache=False).last_hidden_state
        return hidden[:, -self.config.chunk:]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch."""
        pred = self.action_out(self._queries(batch["image"], batch["state"], batch["tokens"]))
        return self.loss_fn(pred, batch["actions"], batch["action_mask"])

    @torch.no_grad()
    def predict(self, image: torch.Tensor, state: torch.Tensor, tokens: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Action chunks (B, H, A) in normalized units."""
        del generator
        return self.action_out(self._queries(image, state, tokens)).float()


def _pretrained(config: ModelConfig):
    """The PaliGemma backbone with the weights saved in ``config.hf_config`` (local files only)."""
    T = transformers_module()
    path = Path(config.hf_config)
    if not config.hf_config or not path.is_dir():
        raise VlampError("model.hf_pretrained needs model.hf_config to be the directory that holds "
                         "the config.json and the safetensors weights")
    try:
        full = T.PaliGemmaForConditionalGeneration.from_pretrained(str(path), local_files_only=True,
                                                                   use_safetensors=True)
    except (OSError, ValueError) as e:
        raise VlampError(f"model.hf_config {config.hf_config!r}: cannot load its weights "
                         f"({str(e).splitlines()[0]})") from None
    return full.model


def preset_parameters(name: str) -> int:
    """The parameter count of the real-size preset ``name`` (built on the meta device: nothing
    is allocated)."""
    with torch.device("meta"):
        model = HFVLA(ModelConfig(name="hf-vlm", size=name, vocab_size=64, channels=[8]))
    return sum(p.numel() for p in model.parameters())
