#!/usr/bin/env python3
"""Writes a tiny Llama-architecture GGUF model with random weights, for running llama.cpp's own
`llama-server` in the third-party check without downloading anything.

    tiny_gguf.py GGUF_PY_DIR OUT.gguf

GGUF_PY_DIR is llama.cpp's `gguf-py` (the source tree the server is built from). The model: 2
layers, 64-wide, 4 heads, f32; a SentencePiece ("llama") vocabulary of the three specials, the
256 byte-fallback tokens and a few hundred word pieces, so any text tokenizes; a ChatML chat
template. Deterministic (seeded), a few hundred KB.
"""
import string
import sys

sys.path.insert(0, sys.argv[1])
import gguf  # noqa: E402
import numpy as np  # noqa: E402

N_EMBD, N_FF, N_LAYER, N_HEAD = 64, 128, 2, 4
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocab():
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for b in range(256):
        tokens.append("<0x%02X>" % b)
        types.append(gguf.TokenType.BYTE)
    pieces = ["\u2581"] + ["\u2581" + c for c in string.ascii_letters + string.digits]
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    pieces += ["\u2581" + w for w in ("the", "hello", "number", "request", "user", "assistant")]
    pieces += ["<|im_start|>", "<|im_end|>"]
    for p in pieces:
        tokens.append(p)
        types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) / 10.0 for i in range(len(pieces))]
    return tokens, scores, types


def main():
    out = sys.argv[2]
    rng = np.random.default_rng(0)
    tokens, scores, types = vocab()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(out, "llama")
    w.add_context_length(2048)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(CHATML)

    def t(name, *shape):
        # numpy shape is ggml's ne reversed: (rows, cols) = (ne1, ne0).
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", n_vocab, N_EMBD)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    t("output.weight", n_vocab, N_EMBD)
    for i in range(N_LAYER):
        w.add_tensor("blk.%d.attn_norm.weight" % i, np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor("blk.%d.ffn_norm.weight" % i, np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t("blk.%d.%s.weight" % (i, name), N_EMBD, N_EMBD)
        t("blk.%d.ffn_gate.weight" % i, N_FF, N_EMBD)
        t("blk.%d.ffn_up.weight" % i, N_FF, N_EMBD)
        t("blk.%d.ffn_down.weight" % i, N_EMBD, N_FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
