"""Tiny random BERT masked-LM models and golden values from transformers, for taper's encoder
parity test (crates/taper-model/tests/bert_parity.rs).

Two variants: `bert` (GELU, tied decoder, two token types) and `bert_relu_untied` (ReLU, its
own decoder matrix). Each is saved with save_pretrained (safetensors + config.json) and a small
char-level WordLevel tokenizer with BERT's specials; golden.safetensors beside it holds fixed
inputs (a padded second row, mixed token types), BertForMaskedLM's logits, the MLM loss over a
few labelled positions, and every parameter's gradient (HF names).

    ~/.venvs/ref/bin/python scripts/golden/bert.py
"""
import pathlib
import shutil

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/taper-model/tests/fixtures/hf"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = list("\n !',.:;?abcdefghijklmnopqrstuvwxyz")
V = len(SPECIALS) + len(CHARS)

COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=16, type_vocab_size=2, layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, pad_token_id=0)
CONFIGS = {
    "bert": BertConfig(**COMMON, hidden_act="gelu"),
    "bert_relu_untied": BertConfig(**COMMON, hidden_act="relu", tie_word_embeddings=False),
}


def tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def main():
    shutil.rmtree(OUT / "bert", ignore_errors=True)
    shutil.rmtree(OUT / "bert_relu_untied", ignore_errors=True)
    fast = tokenizer()
    for name, cfg in CONFIGS.items():
        d = OUT / name
        torch.manual_seed(1)
        model = BertForMaskedLM(cfg).float()
        # Random norms and biases, so no parameter is trivially 1 or 0.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_((1.0 if "LayerNorm.weight" in n else 0.0) + 0.1 * torch.randn_like(p))
        model.save_pretrained(d, safe_serialization=True)
        fast.save_pretrained(d)
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(len(SPECIALS), V, (2, 10), generator=g)
        ids[:, 0] = 2  # [CLS]
        ids[0, 4] = ids[1, 2] = 4  # [MASK]
        ids[1, 7:] = 0  # [PAD]
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        types = torch.zeros_like(ids)
        types[0, 5:] = 1
        types[1, 4:7] = 1
        targets = torch.full_like(ids, -100)
        targets[0, 4], targets[0, 8], targets[1, 2], targets[1, 5] = 11, 20, 30, 7
        model.eval()
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        out = {"ids": ids, "attention_mask": mask, "token_type_ids": types, "targets": targets,
               "logits": logits.detach(), "loss": loss.detach().reshape(1)}
        # Untied, transformers' head adds the decoder's own bias and leaves `cls.predictions.bias`
        # unused (no gradient).
        out.update({f"grad.{n}": p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None})
        save_file(out, str(d / "golden.safetensors"), metadata={"transformers": transformers.__version__})
        print(name, "loss", loss.item(), "params", sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main()
