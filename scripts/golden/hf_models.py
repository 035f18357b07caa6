"""Tiny random Hugging Face models and golden values from transformers, for taper's parity tests.

For each architecture taper loads (gpt2, llama with llama3 rope scaling, mistral with a sliding
window, qwen2, qwen3), builds a tiny random-init model with transformers, saves it with
save_pretrained (safetensors, config.json, generation_config.json) plus a small byte-level BPE
tokenizer (tokenizer.json, tokenizer_config.json), and writes golden.safetensors beside it:
input ids, targets, logits, loss, the gradient of the loss for every parameter (HF names), and
32 greedily generated tokens. Extra variants: gpt2 saved in shards, llama saved in bf16.

    ~/.venvs/ref/bin/pip install torch transformers safetensors
    ~/.venvs/ref/bin/python scripts/golden/hf_models.py
"""
import json
import pathlib
import shutil

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/taper-model/tests/fixtures/hf"
TEXT = ROOT.parent / "shared/data/tinyshakespeare.txt"
V = 300

COMMON = dict(vocab_size=V, bos_token_id=V - 2, eos_token_id=V - 1, tie_word_embeddings=False)
CONFIGS = {
    "gpt2": transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=V - 2, eos_token_id=V - 1),
    "llama": transformers.LlamaConfig(**COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, rope_theta=10000.0,
                                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0, original_max_position_embeddings=64)),
    "mistral": transformers.MistralConfig(**COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                          sliding_window=5, rope_theta=1000.0),
    "qwen2": transformers.Qwen2Config(**{**COMMON, "tie_word_embeddings": True}, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6),
    "qwen3": transformers.Qwen3Config(**{**COMMON, "tie_word_embeddings": True}, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6),
}

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<|im_start|>", "<|im_end|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT.read_text()[:200_000]], trainer)
    # Special tokens at the top of the vocabulary, where the configs put bos and eos.
    assert tok.get_vocab_size() <= V
    return tok


def main():
    torch.manual_seed(0)
    shutil.rmtree(OUT, ignore_errors=True)
    raw = tokenizer()
    for arch, cfg in CONFIGS.items():
        d = OUT / arch
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
        # Random norms, biases too, so no parameter is trivially 1 or 0.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_((1.0 if "norm" in n or "ln" in n else 0.0) + 0.1 * torch.randn_like(p))
        model.generation_config.do_sample = False
        model.save_pretrained(d, safe_serialization=True)
        fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
        fast.chat_template = CHATML
        fast.save_pretrained(d)
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, V - 4, (2, 12), generator=g)
        targets = torch.randint(0, V - 4, (2, 12), generator=g)
        targets[1, 5] = -100
        model.eval()
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        gen = model.generate(ids[:1, :6], max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, 6:]
        out = {"ids": ids, "targets": targets, "logits": logits.detach(), "loss": loss.detach().reshape(1),
               "generated": gen.to(torch.int64)}
        out.update({f"grad.{n}": p.grad.contiguous() for n, p in model.named_parameters()})
        save_file(out, str(d / "golden.safetensors"), metadata={"transformers": transformers.__version__})
        print(arch, "loss", loss.item(), "params", sum(p.numel() for p in model.parameters()))
        if arch == "gpt2":
            model.save_pretrained(OUT / "gpt2_sharded", safe_serialization=True, max_shard_size="40KB")
            fast.save_pretrained(OUT / "gpt2_sharded")
        if arch == "llama":
            half = OUT / "llama_bf16"
            model.to(torch.bfloat16).save_pretrained(half, safe_serialization=True)
            fast.save_pretrained(half)
            m32 = model.to(torch.float32)
            save_file({"ids": ids, "logits": m32(input_ids=ids).logits.detach()}, str(half / "golden.safetensors"))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
