"""Write a tiny random-weight Llama that real vLLM can serve, and print its directory.

No model can be downloaded here, so the end-to-end test makes its own: a 2-layer Llama
(head dim 64, the smallest the CPU attention backend accepts) with a byte-level BPE
tokenizer trained on generated English-like text, and a chat template. Everything is
seeded, so the same inputs give the same files and the same greedy outputs.

Run it with the vLLM environment's python (it needs torch, transformers, tokenizers)::

    python tests/e2e_vllm/tiny_model.py [--cache-dir DIR]

The model goes to ``<cache-dir>/tiny-llama-<digest of this file>`` and is reused while this
file is unchanged. The tokenizer's end-of-sequence row of the output layer is zero, so
its logit is 0 while the largest of the other logits is positive: greedy decoding never
stops early, and every prefill leg (max_tokens=1) ends by length, as P/D needs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "build", "main", "training_text"]

SEED = 1234
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_WORD_TEXT = (
    "the a an of to and in on for with from by at as is are was be this that it we you "
    "they prefill decode engine cache block token prompt request model server gateway "
    "route pick score queue latency memory transfer remote local fast slow long short "
    "first next last every some many few time load share help run wait send pull keep "
    "why how what when where which who explain describe compare list tell me about "
    "system user assistant question answer reply story river mountain city window light "
    "green blue red small large quiet loud morning evening number one two three four five"
)
_WORDS = _WORD_TEXT.split()


def training_text(lines: int = 4000) -> list[str]:
    """Deterministic pseudo-English: enough variety for a useful small BPE vocabulary."""
    rng = random.Random(SEED)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 18))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])
        out.append(sentence)
    out.extend(["<|system|>", "<|user|>", "<|assistant|>", "0123456789 ,.;:!?'\"()[]{}-_/"])
    return out


def _digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def build(out: Path) -> None:
    """Write tokenizer and model files into ``out`` (an empty directory)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.5,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "disagg"
    parser.add_argument("--cache-dir", type=Path, default=default_root)
    args = parser.parse_args(argv)
    target: Path = args.cache_dir / f"tiny-llama-{_digest()}"
    if not (target / "config.json").exists():
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename, so a half-written model is never reused.
        scratch = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=args.cache_dir))
        try:
            build(scratch)
            # OSError: another run won the race, and its files are identical.
            with contextlib.suppress(OSError):
                scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    sys.stdout.write(f"{target}\n")


if __name__ == "__main__":
    main()
