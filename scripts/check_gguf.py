#!/usr/bin/env python3
"""Checks a GGUF file that taper wrote: validates its metadata with the `gguf` package's
reader, runs it in llama.cpp (through llama-cpp-python) with greedy decoding, and compares
the continuation with taper's.

Usage:
    python scripts/check_gguf.py MODEL.gguf --prompt "ROMEO:" [-n 32]
        [--expect-ids "1,2,3" | --expect-ids @ids.txt]   # taper's greedy ids
        [--expect-text "..." | --expect-text @out.txt]   # `taper generate --temperature 0` output
        [--tokenizer tokenizer.json]                      # also tokenize/decode with HF tokenizers
        [--expect-logits logits.txt]                      # taper's logits: report the difference
        [--reference MODEL-f32.gguf]                      # re-quantize its F32 tensors and compare
        [--dump]                                          # print every KV and tensor

Greedy decoding evaluates the prompt, then repeatedly takes the argmax of the last logits
(first index on ties, as taper does) until -n tokens or the EOS token (not counted or printed).
It prints the prompt ids, the generated ids and the text.

--expect-ids compares the generated ids with taper's (the `ids` line of
`cargo run -p taper-cli --example export_gguf -- --model RUN --greedy-prompt P`).
--expect-text compares against taper generate's stdout, which is the prompt followed by the
continuation and a newline; the continuation is decoded with --tokenizer if given (HF decoding,
exactly what taper prints), else with llama.cpp's detokenizer.
--expect-logits reads taper's logits at every position of prompt + continuation (the
--logits-out file of export_gguf) and prints the largest difference from llama.cpp's over the
positions where both saw the same tokens, and taper's smallest top-1/top-2 logit gap (how close the
greedy choice came to flipping). It is a report, not a pass/fail check.
--reference: every F16/Q8_0 tensor must equal gguf-py's quantization of the reference file's F32
tensor of the same name, byte for byte.

llama.cpp's extra buffer types (weight repacking, e.g. the AMX kernels for Q8_0) are off unless
--extra-bufts is given: where the CPU reports AMX but the kernel or sandbox does not grant the AMX
tile state, llama.cpp dies of SIGILL on the first Q8_0 matmul.

Exit status: 0 when every requested check passes, 1 on a mismatch, 2 on an invalid file.
Needs: pip install gguf llama-cpp-python numpy (and tokenizers for --tokenizer).
"""

import argparse
import collections
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf import quants

REQUIRED = {
    "gpt2": ["context_length", "embedding_length", "block_count", "feed_forward_length",
             "attention.head_count", "attention.layer_norm_epsilon"],
    "llama": ["context_length", "embedding_length", "block_count", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
              "rope.freq_base", "rope.dimension_count"],
}
REQUIRED["qwen2"] = REQUIRED["qwen3"] = REQUIRED["llama"]
TOKENIZER_KEYS = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                  "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"]


def field_value(f):
    """A reader field as a Python value (scalars, strings, lists)."""
    t = f.types[0] if f.types else None
    if t == GGUFValueType.ARRAY:
        et = f.types[-1]
        if et == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if t == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def load_meta(path):
    r = GGUFReader(path)
    meta = {k: field_value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return r, meta


def short(v, n=8):
    if isinstance(v, list) and len(v) > n:
        return f"[{', '.join(map(repr, v[:n]))}, ... ({len(v)} items)]"
    if isinstance(v, str) and len(v) > 120:
        return repr(v[:120]) + f"... ({len(v)} chars)"
    return repr(v)


def validate(r, meta, dump):
    """Prints a summary; returns a list of problems."""
    problems = []
    arch = meta.get("general.architecture")
    print(f"architecture {arch}, name {meta.get('general.name')!r}, file_type {meta.get('general.file_type')}, "
          f"alignment {meta.get('general.alignment', 32)}, version {r.fields['GGUF.version'].parts[-1][0]}")
    for k in REQUIRED.get(arch, []):
        if f"{arch}.{k}" not in meta:
            problems.append(f"missing {arch}.{k}")
    for k in TOKENIZER_KEYS:
        if k not in meta:
            problems.append(f"missing {k}")
    hp = {k: v for k, v in meta.items() if k.startswith(f"{arch}.")}
    print("hyperparameters " + ", ".join(f"{k[len(arch) + 1:]}={v}" for k, v in sorted(hp.items())))
    toks = meta.get("tokenizer.ggml.tokens", [])
    types = meta.get("tokenizer.ggml.token_type", [])
    if len(types) != len(toks):
        problems.append(f"{len(toks)} tokens but {len(types)} token types")
    emb = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        problems.append("no token_embd.weight")
    elif int(emb.shape[1]) != len(toks):
        problems.append(f"token_embd.weight has {int(emb.shape[1])} rows, the vocabulary {len(toks)} tokens")
    print(f"tokenizer model {meta.get('tokenizer.ggml.model')!r} pre {meta.get('tokenizer.ggml.pre')!r}: "
          f"{len(toks)} tokens {dict(collections.Counter(types))}, {len(meta.get('tokenizer.ggml.merges', []))} merges, "
          f"bos {meta.get('tokenizer.ggml.bos_token_id')} eos {meta.get('tokenizer.ggml.eos_token_id')} "
          f"pad {meta.get('tokenizer.ggml.padding_token_id')} add_bos {meta.get('tokenizer.ggml.add_bos_token')} "
          f"chat_template {'yes' if 'tokenizer.chat_template' in meta else 'no'}")
    counts = collections.Counter(t.tensor_type.name for t in r.tensors)
    print(f"{len(r.tensors)} tensors: {dict(counts)}")
    for t in r.tensors:
        if t.tensor_type == GGMLQuantizationType.Q8_0 and int(t.shape[0]) % 32:
            problems.append(f"{t.name}: Q8_0 with row length {int(t.shape[0])}")
        if len(t.shape) == 1 and t.tensor_type != GGMLQuantizationType.F32:
            problems.append(f"{t.name}: a 1-D tensor stored as {t.tensor_type.name}")
        if t.data_offset % int(meta.get("general.alignment", 32)):
            problems.append(f"{t.name}: data at {t.data_offset} is not aligned")
    if dump:
        for k, v in meta.items():
            print(f"  {k} = {short(v)}")
        for t in r.tensors:
            print(f"  {t.name} {t.tensor_type.name} {[int(d) for d in t.shape]}")
    return problems


def compare_reference(r, ref_path):
    """Re-quantizes the reference's F32 tensors with gguf-py and compares bytes."""
    ref = {t.name: t for t in GGUFReader(ref_path).tensors}
    bad, checked = [], 0
    for t in r.tensors:
        if t.tensor_type not in (GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0):
            continue
        src = ref.get(t.name)
        if src is None or src.tensor_type != GGMLQuantizationType.F32:
            bad.append(f"{t.name}: no F32 tensor in the reference")
            continue
        shape = [int(d) for d in reversed(src.shape)]
        want = quants.quantize(np.asarray(src.data, dtype=np.float32).reshape(shape), t.tensor_type)
        got = np.asarray(t.data)
        checked += 1
        if want.tobytes() != got.tobytes():
            bad.append(f"{t.name}: {t.tensor_type.name} bytes differ from gguf-py's quantization")
    print(f"reference: {checked} F16/Q8_0 tensors re-quantized from {ref_path}: "
          f"{'all identical' if not bad else f'{len(bad)} differ'}")
    return bad


def arg_text(s):
    if s is not None and s.startswith("@"):
        with open(s[1:], encoding="utf-8") as f:
            return f.read()
    return s


def parse_ids(s):
    """"1,2,3", or the `ids 1,2,3` line of export_gguf's --greedy-prompt output."""
    lines = [ln for ln in s.splitlines() if ln.startswith("ids ")]
    s = lines[0][4:] if lines else s
    return [int(x) for x in s.replace(",", " ").split()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("-n", "--n-tokens", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=0, help="default: the model's context_length")
    ap.add_argument("--expect-ids")
    ap.add_argument("--expect-text")
    ap.add_argument("--tokenizer")
    ap.add_argument("--expect-logits")
    ap.add_argument("--reference")
    ap.add_argument("--dump", action="store_true")
    ap.add_argument("--extra-bufts", action="store_true",
                    help="let llama.cpp repack weights into extra buffer types (AMX on recent Xeons)")
    a = ap.parse_args()

    r, meta = load_meta(a.model)
    problems = validate(r, meta, a.dump)
    if a.reference:
        problems += compare_reference(r, a.reference)
    if problems:
        for p in problems:
            print(f"INVALID: {p}")
        return 2

    import llama_cpp.llama_cpp as lc  # after validation: loading is slow and its errors are opaque
    from llama_cpp import Llama

    if not a.extra_bufts:
        default_params = lc.llama_model_default_params

        def params_without_extra_bufts():
            p = default_params()
            p.use_extra_bufts = False
            return p

        lc.llama_model_default_params = params_without_extra_bufts

    arch = meta["general.architecture"]
    n_ctx = a.n_ctx or int(meta[f"{arch}.context_length"])
    # logits_all: llama-cpp-python keeps the logits (its `scores`) only then.
    llm = Llama(model_path=a.model, n_ctx=n_ctx, n_batch=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    prompt_ids = llm.tokenize(a.prompt.encode("utf-8"), add_bos=add_bos, special=False)
    print(f"prompt_ids {','.join(map(str, prompt_ids))}")
    failed = False
    hf = None
    if a.tokenizer:
        from tokenizers import Tokenizer
        hf = Tokenizer.from_file(a.tokenizer)
        hf_ids = hf.encode(a.prompt, add_special_tokens=add_bos).ids
        if hf_ids != prompt_ids:
            print(f"MISMATCH prompt tokenization: HF tokenizers gives {','.join(map(str, hf_ids))}")
            failed = True

    eos = meta.get("tokenizer.ggml.eos_token_id")
    llm.eval(prompt_ids)
    ids = []
    for _ in range(a.n_tokens):
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        nxt = int(np.argmax(logits))
        if nxt == eos:
            break
        ids.append(nxt)
        if len(ids) < a.n_tokens:
            llm.eval([nxt])
    text = llm.detokenize(ids).decode("utf-8", errors="replace")
    print(f"ids {','.join(map(str, ids))}")
    print(f"text {text!r}")
    if hf is not None:
        hf_text = hf.decode(ids, skip_special_tokens=False)
        print(f"text (HF decode) {hf_text!r}")
        text = hf_text

    if a.expect_ids is not None:
        want = parse_ids(arg_text(a.expect_ids))
        if want == ids:
            print(f"OK ids: all {len(ids)} match taper")
        else:
            k = next((i for i, (x, y) in enumerate(zip(want, ids)) if x != y), min(len(want), len(ids)))
            print(f"MISMATCH ids at position {k}: taper {want[k:k + 8]} llama.cpp {ids[k:k + 8]} "
                  f"({k} of {len(want)} match before it)")
            failed = True
    if a.expect_text is not None:
        want = arg_text(a.expect_text)
        want = want[:-1] if want.endswith("\n") else want
        got = a.prompt + text
        if want == got:
            print("OK text matches taper")
        else:
            k = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), min(len(want), len(got)))
            print(f"MISMATCH text at char {k}: taper {want[k:k + 30]!r} llama.cpp {got[k:k + 30]!r}")
            failed = True
    if a.expect_logits:
        # Row i holds the logits after token i; rows agree in meaning only while both
        # sequences (prompt + continuation) are the same up to token i.
        same = len(prompt_ids) + len(ids)
        if a.expect_ids is not None:
            want = parse_ids(arg_text(a.expect_ids))
            same = len(prompt_ids) + next((i for i, (x, y) in enumerate(zip(want, ids)) if x != y),
                                          min(len(want), len(ids)))
        ref = np.loadtxt(a.expect_logits, dtype=np.float64, ndmin=2)
        n = min(len(ref), llm.n_tokens, same)
        ours = np.asarray(llm.scores[:n], dtype=np.float64)
        diff = np.abs(ours - ref[:n])
        top2 = np.sort(ref[:n], axis=1)[:, -2:]
        print(f"logits over the {n} positions with the same input: max |taper - llama.cpp| {diff.max():.3g} "
              f"(mean {diff.mean():.3g}, logit range {ref[:n].min():.3g}..{ref[:n].max():.3g}); "
              f"smallest taper top-1/top-2 gap {np.min(top2[:, 1] - top2[:, 0]):.3g}")
        if same < len(prompt_ids) + len(ids) and same - 1 < n:
            r = same - 1
            print(f"at the first different token, taper's top-1/top-2 gap was {top2[r, 1] - top2[r, 0]:.3g} "
                  f"and the logits differed by up to {diff[r].max():.3g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
