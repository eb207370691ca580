"""The [lora] section: low-rank adapters on a frozen base model (LoRA, Hu et al. 2021)."""
from __future__ import annotations

from dataclasses import dataclass, field

from patchflow.checks import ConfigError

DEFAULT_TARGETS = ("attn.*",)  # every attention projection: both streams of a joint block, DiT's qkv and out


@dataclass
class LoRAConfig:
    rank: int = 0                         # 0: off (full fine-tuning or training from scratch); >= 1: adapters of this
                                          # rank on the base of train.init_from, which stays frozen
    alpha: float = 0.0                    # the update is (alpha / rank) * up @ down; 0 means alpha = rank (scale 1)
    dropout: float = 0.0                  # dropout on the adapter's input (PEFT's lora_dropout)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
                                          # fnmatch patterns on Linear module names, matched against the full name
                                          # ("blocks.3.attn.qkv") and the name inside its block ("attn.qkv"):
                                          # "attn.*", "attn.text_*" (the text stream), "mlp.*", "x_embedder.proj"
    blocks: list[int] = field(default_factory=list)  # only these block indices (0-based); [] = every block and
                                          # the modules outside blocks
    quantize_base: str = ""               # "int8": the frozen base's Linear weights held as int8 (weight-only,
                                          # torchao) while the adapters train, a quarter of their fp32 memory
    base_hash: str = ""                   # sha256 of the base weights, recorded by the trainer at step 0; a resume,
                                          # `patchflow sample` and merges refuse a base that changed

    @property
    def enabled(self) -> bool:
        return self.rank != 0

    @property
    def scale(self) -> float:
        """alpha / rank: the factor on up @ down."""
        return (self.alpha or self.rank) / self.rank

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 1 (or 0: no adapters), got {self.rank}")
        if self.alpha < 0:
            raise ConfigError(f"lora.alpha must be >= 0 (0 means alpha = rank), got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.enabled and not [t for t in self.targets if t.strip()]:
            raise ConfigError("lora.targets is empty: give module name patterns, e.g. [\"attn.*\"]")
        if self.quantize_base not in ("", "int8"):
            raise ConfigError(f"lora.quantize_base must be \"\" (off) or \"int8\", got {self.quantize_base!r}")
        if self.quantize_base and not self.enabled:
            raise ConfigError("lora.quantize_base quantizes the frozen base of a LoRA run: set lora.rank too")
        if any(b < 0 for b in self.blocks):
            raise ConfigError(f"lora.blocks are 0-based block indices, got {self.blocks}")
