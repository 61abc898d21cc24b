"""Generate (once) and cache the tiny Llama-architecture model every command defaults to.

The weights are random but fixed (seeded), float32 so greedy decoding is stable token for
token, and the BPE tokenizer is trained here on the corpus shipped beside this file. Nothing
is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

CORPUS = Path(__file__).with_name("corpus.txt")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """The shape of the generated model; `name`, `version` and `seed` make its cache key."""

    name: str = "tiny-llama"
    version: int = 2
    seed: int = 0
    vocab_target: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA: fewer KV heads than query heads
    head_dim: int = 32
    max_position_embeddings: int = 4096
    # Wider than the usual 0.02 so greedy output varies with the prompt (and a wrong KV
    # cache shows up as different tokens) instead of repeating one token.
    initializer_range: float = 0.1

    @property
    def cache_name(self) -> str:
        return f"{self.name}-v{self.version}-s{self.seed}"


# For `pdcluster bench compare`: large enough that a long prompt's prefill keeps a CPU core
# busy for a real fraction of a second (~26M parameters, float32), still generated locally.
BENCH_MODEL = TinyModelSpec(
    name="bench-llama",
    version=1,
    hidden_size=512,
    intermediate_size=1408,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    initializer_range=0.02,
)


# For long prompts (32K to 128K tokens): the tiny model with 128K positions, otherwise the same.
LONG_MODEL = TinyModelSpec(name="tiny-llama-long", version=1, max_position_embeddings=131072)

# A second model for multi-model clusters: the tiny model's shape, other weights.
OTHER_MODEL = TinyModelSpec(seed=1)

VARIANTS = {"tiny": TinyModelSpec(), "bench": BENCH_MODEL, "long": LONG_MODEL, "other": OTHER_MODEL}


def default_cache_root() -> Path:
    root = os.environ.get("PDCLUSTER_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "pdcluster")
    return Path(root) / "models"


def _train_tokenizer(spec: TinyModelSpec, out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_target,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(CORPUS)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec.max_position_embeddings
    fast.save_pretrained(out)
    return len(fast)


def _build_model(spec: TinyModelSpec, vocab_size: int, bos: int, eos: int, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
        initializer_range=spec.initializer_range,
        torch_dtype="float32",  # type: ignore[call-arg]  # kept in config.json as transformers writes it
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]  # transformers' stubs miss dtype
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(out)


def ensure_tiny_model(out: Path | None = None, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Return the model directory, generating it first if it is not cached yet."""
    target = Path(out) if out else default_cache_root() / spec.cache_name
    marker = target / "pdcluster_tiny_model.json"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent callers never see half a model.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        vocab = _train_tokenizer(spec, staging)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(staging)
        padded_vocab = (vocab + 63) // 64 * 64
        _build_model(spec, padded_vocab, tok.bos_token_id, tok.eos_token_id, staging)
        (staging / "pdcluster_tiny_model.json").write_text(json.dumps(asdict(spec)))
        try:
            staging.rename(target)
        except OSError:
            if not marker.exists():  # lost a race to another process: theirs is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
