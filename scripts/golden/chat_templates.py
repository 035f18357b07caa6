"""Golden chat-template renders and token ids from transformers, for taper-data's chat tests.

Renders a few conversations with `apply_chat_template` (tokenize=False for the string,
tokenize=True for the ids) under three templates: taper's built-in ChatML, ChatML with HF's
`{% generation %}` tags (to compare taper's loss mask against HF's assistant mask), and a
Llama-3-style template that exercises namespace, loop, trim, tojson, string methods,
raise_exception and trim_blocks/lstrip_blocks whitespace. Writes
crates/taper-data/tests/fixtures/chat_<name>.json plus the tokenizers they use.

    ~/.venvs/ref/bin/python scripts/golden/chat_templates.py
"""
import json
import pathlib

import transformers
from tokenizers import AddedToken, Tokenizer, processors
from transformers import PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/taper-data/tests/fixtures"
BASE_TOKENIZER = ROOT / "crates/taper-model/tests/fixtures/hf/llama/tokenizer.json"

# Must equal taper_data::chat::CHATML (the Rust test checks).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHATML_GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = """{{- bos_token }}
{%- set ns = namespace(system='', turns=0) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'].strip() %}
    {%- set messages = messages[1:] %}
{%- endif %}
{%- if ns.system %}
<|start_header_id|>system<|end_header_id|>

{{ ns.system }}<|eot_id|>
{%- endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['content'].startswith('/meta ') %}
        {%- set content = 'meta: ' + ({'arg': message['content'][6:], 'turn': ns.turns} | tojson) %}
    {%- else %}
        {%- set content = message['content'] | trim %}
    {%- endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ content }}<|eot_id|>
    {%- set ns.turns = ns.turns + 1 %}
    {%- if loop.last and message['role'] == 'user' and not add_generation_prompt %}
        {% for _ in range(2) %}{% if loop.index > 1 %}{% break %}{% endif %}{{ eos_token }}{% endfor %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

SYSTEM_MULTI = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]
CONVERSATIONS = [
    (SYSTEM_MULTI, False),
    (SYSTEM_MULTI[:-1], True),
    ([{"role": "user", "content": "  Hello, café!  \n"}, {"role": "assistant", "content": "\nBonjour !\n\n"}], False),
    ([{"role": "user", "content": "/meta {\"k\": \"é<&>\"}"}, {"role": "assistant", "content": "ok"}], False),
    ([{"role": "user", "content": "Say something."}], False),
    ([{"role": "user", "content": "Say something."}], True),
]
ERRORS = [
    [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi again"}],
    [{"role": "assistant", "content": "I speak first"}],
]


def llama3_tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(BASE_TOKENIZER))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    bos = tok.token_to_id("<|begin_of_text|>")
    # Like Llama 3's own tokenizer: encoding with special tokens prepends BOS. apply_chat_template
    # must not (the template writes bos_token itself), which the golden ids check.
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return tok


def write(name: str, template: str, tok: Tokenizer, specials: dict, masks: bool):
    tok_dir = OUT / name
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps({**specials, "chat_template": template}, indent=2, ensure_ascii=False) + "\n"
    )
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), **specials)
    cases = []
    for messages, agp in CONVERSATIONS:
        text = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=agp, tokenize=False)
        ids = hf.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=agp, tokenize=True, return_dict=False
        )
        case = {"messages": messages, "add_generation_prompt": agp, "text": text, "ids": list(ids)}
        if masks:
            out = hf.apply_chat_template(
                messages,
                chat_template=template,
                add_generation_prompt=agp,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            assert list(out["input_ids"]) == case["ids"]
            case["assistant_masks"] = list(out["assistant_masks"])
        cases.append(case)
    errors = []
    for messages in ERRORS:
        try:
            hf.apply_chat_template(messages, chat_template=template, tokenize=False)
        except Exception as e:  # jinja2's TemplateError from raise_exception
            errors.append({"messages": messages, "message": str(e)})
    fixture = {
        "transformers": transformers.__version__,
        "template": template,
        "special_tokens": specials,
        "tokenizer": f"{name}/tokenizer.json",
        "cases": cases,
        "errors": errors,
    }
    (OUT / f"chat_{name}.json").write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"{name}: {len(cases)} cases, {len(errors)} errors")


def main():
    base = Tokenizer.from_file(str(BASE_TOKENIZER))
    write("chatml", CHATML, base, {"bos_token": "<s>", "eos_token": "<|im_end|>"}, masks=False)
    write("chatml_generation", CHATML_GENERATION, base, {"bos_token": "<s>", "eos_token": "<|im_end|>"}, masks=True)
    write("llama3", LLAMA3, llama3_tokenizer(), {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
          masks=False)


if __name__ == "__main__":
    main()
