"""Builds a real-architecture causal LM with random weights and its tokenizer, offline.

    python3 make_model.py OUT_DIR [--shape llama-1b|tiny] [--device cuda:0|cpu]

`llama-1b` is Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads, 8 KV heads, MLP 8192)
with a 32k byte-level BPE vocabulary trained here on generated text; `tiny` is the same
architecture small enough for a CPU dry run. No download: the weights are random and the
tokenizer is trained in a second. The end-of-sequence row of the output projection is zeroed,
so greedy decoding never ends a response early and a request's length is its `max_tokens`.
"""

import argparse
import json
import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab=32768),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab=4096),
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus(n_lines, seed):
    """Generated text: pseudo-words over a fixed alphabet, so the BPE learns real merges."""
    rng = random.Random(seed)
    syll = ["ka", "to", "ri", "mu", "sen", "va", "lo", "pe", "dra", "qui", "zo", "ne", "ba",
            "th", "or", "an", "is", "el", "um", "fa", "gi", "he", "ju", "wy"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    for _ in range(n_lines):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + "."


def build_tokenizer(out, vocab):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(20000, 1), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>",
                                   pad_token="<|pad|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    shape = dict(SHAPES[a.shape])
    fast = build_tokenizer(a.out, shape.pop("vocab"))
    vocab = (len(fast) + 63) // 64 * 64
    eos = fast.convert_tokens_to_ids("<|end|>")
    pad = fast.convert_tokens_to_ids("<|pad|>")
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=16384, rope_theta=500000.0,
                      tie_word_embeddings=False, eos_token_id=eos, pad_token_id=pad,
                      bos_token_id=None, dtype="bfloat16", **shape)
    torch.manual_seed(0)
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight[eos].zero_()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.do_sample = False
    model.save_pretrained(a.out)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model": a.out, "shape": a.shape, "params": n, "vocab": vocab,
                      "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}))


if __name__ == "__main__":
    main()
