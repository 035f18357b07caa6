"""Tiny random MarianMTModels and golden values from transformers, for taper's encoder-decoder
parity tests (crates/taper-model/tests/seq2seq_parity.rs).

Two variants: `marian` (shared source/target embeddings tied to the head, GELU, scaled
embeddings, 2 encoder and 3 decoder layers) and `marian_untied` (separate embeddings and head,
ReLU, no embedding scale). Each is saved with save_pretrained (config.json, model.safetensors,
generation_config.json) beside golden.safetensors: a padded source batch and its attention
mask, decoder inputs, logits, labels with ignored positions, the label-smoothed loss
(CrossEntropyLoss(label_smoothing=0.1)), the gradient of that loss for every parameter (HF
names), and greedy and beam-search outputs of generate().

    ~/.venvs/ref/bin/python scripts/golden/seq2seq.py
"""
import pathlib
import shutil

import torch
import transformers
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/taper-model/tests/fixtures/hf"
V, PAD, EOS = 40, 39, 0

COMMON = dict(vocab_size=V, decoder_vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=3,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
              max_position_embeddings=32, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
              forced_eos_token_id=None, bad_words_ids=None, dropout=0.0, attention_dropout=0.0,
              activation_dropout=0.0, init_std=0.15)
CONFIGS = {
    "marian": transformers.MarianConfig(**COMMON, activation_function="gelu", scale_embedding=True,
                                        share_encoder_decoder_embeddings=True, tie_word_embeddings=True),
    "marian_untied": transformers.MarianConfig(**COMMON, activation_function="relu", scale_embedding=False,
                                               share_encoder_decoder_embeddings=False, tie_word_embeddings=False),
}
SRC = [[5, 9, 3, 17, 22, 8, EOS], [12, 4, 30, 7, EOS, PAD, PAD]]
DEC_IN = [[PAD, 6, 11, 2, 25, 13], [PAD, 19, 19, 3, 8, 1]]
LABELS = [[6, 11, 2, 25, 13, EOS], [19, 19, 3, -100, 1, -100]]


def main():
    for name, cfg in CONFIGS.items():
        d = OUT / name
        shutil.rmtree(d, ignore_errors=True)
        torch.manual_seed(1)
        model = transformers.MarianMTModel(cfg).float().eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "embed_positions" in n:
                    continue  # the fixed sinusoidal tables
                if p.dim() == 1:
                    p.copy_((1.0 if "norm" in n else 0.0) + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.3 * torch.randn_like(p))
            # A nonzero final_logits_bias (a buffer), leaning towards eos so generation stops.
            model.final_logits_bias.copy_(0.1 * torch.randn(1, V))
            model.final_logits_bias[0, EOS] += 2.2
        model.generation_config.do_sample = False
        model.save_pretrained(d, safe_serialization=True)

        src = torch.tensor(SRC)
        mask = (src != PAD).long()
        dec_in = torch.tensor(DEC_IN)
        labels = torch.tensor(LABELS)
        model.zero_grad()
        out = model(input_ids=src, attention_mask=mask, decoder_input_ids=dec_in)
        logits = out.logits
        loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits.reshape(-1, V), labels.reshape(-1))
        loss.backward()
        g = {
            "src": src, "src_mask": mask, "dec_in": dec_in, "labels": labels,
            "logits": logits.detach().contiguous(), "loss_ls": loss.detach().reshape(1),
        }
        for n, p in model.named_parameters():
            if p.grad is not None:
                g[f"grad.{n}"] = p.grad.detach().contiguous()
        with torch.no_grad():
            greedy = model.generate(input_ids=src, attention_mask=mask, num_beams=1, do_sample=False,
                                    max_new_tokens=12)
            beams = {}
            for nb, lp in [(3, 1.0), (4, 0.6), (4, 2.0)]:
                outs = []
                for row in range(len(SRC)):
                    s, m = src[row:row + 1], mask[row:row + 1]
                    o = model.generate(input_ids=s, attention_mask=m, num_beams=nb, do_sample=False,
                                       max_new_tokens=12, length_penalty=lp, early_stopping=False)
                    outs.append(o[0])
                width = max(len(o) for o in outs)
                beams[f"beam{nb}_lp{lp}"] = torch.stack(
                    [torch.cat([o, torch.full((width - len(o),), -1, dtype=o.dtype)]) for o in outs])
        # generate() pads finished rows with pad_token_id; -1 marks "nothing" for taper's test.
        gr = greedy.clone()
        for r in range(gr.shape[0]):
            row = gr[r, 1:]
            hit = (row == EOS).nonzero()
            if len(hit):
                row[hit[0, 0] + 1:] = -1
        g["greedy"] = gr
        for k, v in beams.items():
            g[k.replace(".", "_")] = v
        save_file({k: v.contiguous() for k, v in g.items()}, d / "golden.safetensors")
        print(name, "greedy", gr.tolist())
        for k, v in beams.items():
            print(name, k, v.tolist())


if __name__ == "__main__":
    main()
