"""Server settings: one pydantic-settings model read from CLI flags, `CTC_*` environment variables
and defaults, in that order of precedence. The CLI builds its flags from these fields, so every
setting is documented and bounded once.

Defaults serve the demo model embedded in the repository (models/demo-llama) with its CTC
drafter and prompt lookup together when the CTC drafter has been trained (models/demo-llama-ctc),
else the model-free n-gram drafter alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DRAFTER_CHOICES = ("none", "ngram")  # besides a drafter directory
HYBRID_SUFFIX = "+ngram"  # DIRECTORY+ngram: that drafter and prompt lookup in one tree
DRAFTER_DIR_SUFFIX = "-ctc"  # models/<name>-ctc is the CTC drafter trained for models/<name>


def default_model_dir() -> Path:
    return REPO_ROOT / "models" / "demo-llama"


class Settings(BaseSettings):
    """Everything `ctc-serve` can be told; env var = CTC_ + upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="CTC_", extra="ignore", validate_default=True)

    model: Path = Field(
        default_factory=default_model_dir,
        description="Base model directory (Hugging Face layout: config.json, *.safetensors, tokenizer).",
    )
    drafter: str | None = Field(
        None,
        description=(
            "Draft model: a CTC drafter directory, 'ngram' (prompt-lookup drafting, no weights), a drafter "
            "directory followed by '+ngram' (both, merged into one draft tree per step) or 'none' "
            f"(no speculation). Default: <model>{DRAFTER_DIR_SUFFIX}{HYBRID_SUFFIX} if the sibling directory "
            f"<model>{DRAFTER_DIR_SUFFIX} exists, else 'ngram'."
        ),
    )
    served_model_name: str | None = Field(
        None, description="Model id clients send and /v1/models lists. Default: the model directory's name."
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all interfaces, as in Docker).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    tensor_parallel_size: int = Field(
        1, ge=1, le=64,
        description="Split the base model across this many processes (Megatron-style: attention heads and MLP "
        "columns per rank, all-reduced). ctc-serve starts the extra ranks itself: on CUDA rank r uses cuda:r (NCCL), "
        "on the CPU the ranks talk over gloo. The model's KV heads, attention heads and intermediate size must "
        "divide by it.",
    )
    max_batch_size: int = Field(16, ge=1, le=1024, description="Most sequences decoded together in one step.")
    max_model_len: int | None = Field(
        None, ge=16, le=1 << 20,
        description="Context limit per request: prompt plus generated tokens; sizes the KV cache (slots x this). "
        "Default: the model's max_position_embeddings, on CUDA lowered to what fits in --gpu-memory-utilization, "
        "on the CPU capped at 2048.",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1,
        description="Share of the GPU's total memory this server may use (weights, activations, KV cache), as in "
        "vLLM; the KV cache gets what is left after loading. Ignored on the CPU.",
    )
    default_max_tokens: int = Field(
        1024, ge=1, description="max_tokens of requests that set none (lowered to what fits in max_model_len)."
    )
    max_tree_nodes: int | None = Field(
        None, ge=0, le=256, description="Draft tokens verified per sequence and step at low load (0: no speculation). "
        "Default: 16 on a GPU, 8 on a CPU, where every tree token is compute."
    )
    spec_token_budget: int = Field(
        48, ge=0, description="Draft tokens per step shared by all sequences: trees shrink as the batch grows."
    )
    governor: bool = Field(
        True, description="Pick each step's tree size (down to none) by measured tokens/s; false: always the "
        "largest allowed."
    )
    acceptance: Literal["auto", "path", "all-nodes"] = Field(
        "auto", description="How drafts are accepted: 'path' computes logits only where the acceptance walk goes "
        "(one LM-head call and host round trip per tree depth: least work, best on the CPU); 'all-nodes' computes "
        "every tree node's logits in one call and walks the trees on the device (one host copy per step: best on "
        "a GPU); auto: all-nodes on CUDA, path on the CPU. Outputs are identical."
    )
    enforce_eager: bool = Field(
        False, description="Run every forward eagerly: no CUDA graphs. Default: decode and verify steps that fit a "
        "graph bucket (up to --max-batch-size sequences x --max-tree-nodes + 1 tokens) replay graphs captured at "
        "start-up, on CUDA with the Triton kernels; the CPU always runs eagerly.",
    )
    prefill_step_ratio: float = Field(
        1.5, ge=0, description="While sequences decode, a step that also prefills a prompt is sized to cost at most "
        "this many decode steps, from measured step costs (it bounds their inter-token latency); 0: full 256-token "
        "prompt chunks whatever decodes (faster time to first token, longer stalls of running streams)."
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (CUDA if available), cpu, cuda or cuda:N."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weight and activation dtype; auto: bfloat16 on CUDA, float32 on CPU."
    )
    api_key: SecretStr | None = Field(
        None, description="If set, every request but /health and /metrics must send 'Authorization: Bearer <key>'."
    )
    max_queue: int = Field(
        256, ge=0, description="Most requests waiting for a batch slot; more are refused with 429."
    )
    max_request_bytes: int = Field(
        4 << 20, ge=1024, description="Largest request body accepted; a larger one gets 413. 4 MiB holds a "
        "128k-token prompt (about 0.5 MB of text) with room for JSON escapes.",
    )
    request_body_timeout: float = Field(
        30.0, gt=0, description="Seconds a request body may take to arrive in full after its headers; a slower "
        "or incomplete one gets 408 and its connection is closed.",
    )
    shutdown_timeout: int = Field(
        10, ge=0, description="Seconds to let requests in flight finish after SIGTERM before aborting them."
    )
    per_request_spec_decode_metrics: bool = Field(
        False, description="Each response (the last chunk of a stream) carries `spec_decode`: the request's "
        "drafts, draft tokens, accepted tokens and acceptance length, as vLLM's flag of the same name.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Logging level.")

    @field_validator("prefill_step_ratio")
    @classmethod
    def _ratio_above_one(cls, ratio: float) -> float:
        if 0 < ratio <= 1:
            raise ValueError("must be above 1 (a step with a prompt chunk costs more than one without), or 0 for off")
        return ratio

    @field_validator("model")
    @classmethod
    def _model_dir_exists(cls, model: Path) -> Path:
        model = model.expanduser().resolve()
        if not model.is_dir():
            raise ValueError(f"model directory {model} does not exist")
        return model

    @field_validator("drafter")
    @classmethod
    def _drafter_known(cls, drafter: str | None) -> str | None:
        if drafter is None or drafter.lower() in DRAFTER_CHOICES:
            return drafter and drafter.lower()
        hybrid = drafter.endswith(HYBRID_SUFFIX)
        path = Path(drafter.removesuffix(HYBRID_SUFFIX)).expanduser().resolve()
        if not path.is_dir():
            raise ValueError(f"drafter must be a directory, a directory + '+ngram', 'ngram' or 'none'; {path} does not exist")
        return str(path) + (HYBRID_SUFFIX if hybrid else "")

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if self.drafter is None:
            sibling = self.model.with_name(self.model.name + DRAFTER_DIR_SUFFIX)
            self.drafter = str(sibling) + HYBRID_SUFFIX if sibling.is_dir() else "ngram"
        if not self.served_model_name:
            self.served_model_name = self.model.name
        return self

    @property
    def drafter_path(self) -> Path | None:
        """The drafter directory, or None for 'ngram' and 'none'."""
        return None if self.drafter in DRAFTER_CHOICES else Path(str(self.drafter).removesuffix(HYBRID_SUFFIX))
