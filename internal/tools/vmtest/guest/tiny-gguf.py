#!/usr/bin/python3
"""Writes a tiny random llama model in GGUF, for supervising a real
llama-server with no model download: its text is noise, every endpoint is
real. Made with llama.cpp's own writer (python3-gguf).

    tiny-gguf.py OUT [--blocks N] [--embd N] [--seed N] [--name NAME]

More blocks or a bigger embedding make a bigger, slower model (load time,
memory and OOM checks); another seed makes another digest.
"""
import argparse

import gguf
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--ff", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--name", default="tiny")
    ap.add_argument("--ctx", type=int, default=16384)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    embd, heads, ff = a.embd, 4, a.ff or 2 * a.embd

    # SPM vocabulary: specials, every byte token (without them a prompt
    # such as "Hi" fails with HTTP 400), SPM's space and a few pieces.
    tokens, scores, types = [], [], []

    def tok(text, kind, score=0.0):
        tokens.append(text.encode())
        scores.append(score)
        types.append(kind)

    tok("<unk>", gguf.TokenType.UNKNOWN)
    tok("<s>", gguf.TokenType.CONTROL)
    tok("</s>", gguf.TokenType.CONTROL)
    for b in range(256):
        tok("<0x%02X>" % b, gguf.TokenType.BYTE)
    for i, piece in enumerate(["\u2581", "\u2581the", "\u2581a", "e", "t", "o", "\u2581hello", "\u2581world"]):
        tok(piece, gguf.TokenType.NORMAL, -float(i))
    vocab = len(tokens)

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name(a.name)
    w.add_context_length(a.ctx)
    w.add_embedding_length(embd)
    w.add_block_count(a.blocks)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(embd // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def t(name, *shape):
        w.add_tensor(name, rng.normal(0, 0.02, shape).astype(np.float32))

    t("token_embd.weight", vocab, embd)
    w.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
    t("output.weight", vocab, embd)
    for i in range(a.blocks):
        p = "blk.%d." % i
        w.add_tensor(p + "attn_norm.weight", np.ones(embd, dtype=np.float32))
        t(p + "attn_q.weight", embd, embd)
        t(p + "attn_k.weight", embd, embd)
        t(p + "attn_v.weight", embd, embd)
        t(p + "attn_output.weight", embd, embd)
        w.add_tensor(p + "ffn_norm.weight", np.ones(embd, dtype=np.float32))
        t(p + "ffn_gate.weight", ff, embd)
        t(p + "ffn_up.weight", ff, embd)
        t(p + "ffn_down.weight", embd, ff)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
