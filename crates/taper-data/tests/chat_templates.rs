//! Chat templates against transformers' `apply_chat_template` (fixtures written by
//! scripts/golden/chat_templates.py): rendered strings, token ids, HF's assistant mask, and
//! `raise_exception` messages.

use serde_json::Value;
use std::path::{Path, PathBuf};
use taper_data::chat::{ChatTemplate, Message, Role, CHATML};
use taper_data::sft::{show_mask, EncodeOptions, Example, SftEncoder, IGNORE_INDEX};
use taper_data::{tokenizer, DataError};
use tokenizers::Tokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Golden {
    json: Value,
    template: ChatTemplate,
    tok: Tokenizer,
}

fn golden(name: &str) -> Golden {
    let dir = fixtures();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("chat_{name}.json"))).unwrap()).unwrap();
    let template = ChatTemplate::from_tokenizer_config(&dir.join(name).join("tokenizer_config.json")).unwrap();
    assert_eq!(template.source(), json["template"].as_str().unwrap());
    let tok = tokenizer::load(&dir.join(json["tokenizer"].as_str().unwrap())).unwrap();
    Golden { json, template, tok }
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(Role::parse(m["role"].as_str().unwrap()).unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Renders and tokenises every case as apply_chat_template(tokenize=False / True) did.
fn check_cases(g: &Golden) -> usize {
    let cases = g.json["cases"].as_array().unwrap();
    for (i, case) in cases.iter().enumerate() {
        let msgs = messages(&case["messages"]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let text = g.template.render(&msgs, agp).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "case {i}");
        let enc = g.tok.encode(text.as_str(), false).unwrap();
        assert_eq!(enc.get_ids(), ids(&case["ids"]), "case {i}");
    }
    cases.len()
}

fn check_errors(g: &Golden) -> usize {
    let errors = g.json["errors"].as_array().unwrap();
    for e in errors {
        match g.template.render(&messages(&e["messages"]), false) {
            Err(DataError::TemplateRaised { message }) => assert_eq!(message, e["message"].as_str().unwrap()),
            other => panic!("expected the template to raise, got {other:?}"),
        }
    }
    errors.len()
}

fn encode_conversation(g: &Golden, msgs: Vec<Message>) -> taper_data::sft::Tokenized {
    let enc = SftEncoder::new(&g.tok, &g.template, EncodeOptions::default()).unwrap();
    enc.encode(&Example::Conversation { messages: msgs, train_from: 0 }).unwrap()
}

#[test]
fn chatml_matches_transformers() {
    let g = golden("chatml");
    assert_eq!(CHATML, g.json["template"].as_str().unwrap(), "the built-in ChatML is the golden one");
    assert_eq!(check_cases(&g), 6);
    // The built-in constant renders the same as the one read from tokenizer_config.json.
    let case = &g.json["cases"][0];
    let builtin = ChatTemplate::chatml().render(&messages(&case["messages"]), false).unwrap();
    assert_eq!(builtin, case["text"].as_str().unwrap());
}

#[test]
fn llama3_style_matches_transformers() {
    let g = golden("llama3");
    assert_eq!(check_cases(&g), 6);
    assert_eq!(check_errors(&g), 2);
}

#[test]
fn loss_mask_equals_transformers_assistant_mask() {
    // HF's mask comes from `{% generation %}` around content + <|im_end|>; taper's from the
    // content spans plus the end-of-turn token. They must select the same tokens.
    let g = golden("chatml_generation");
    check_cases(&g);
    let mut compared = 0;
    for case in g.json["cases"].as_array().unwrap() {
        let msgs = messages(&case["messages"]);
        if case["add_generation_prompt"].as_bool().unwrap() || !msgs.iter().any(|m| m.role == Role::Assistant) {
            continue;
        }
        let t = encode_conversation(&g, msgs);
        assert_eq!(t.input_ids, ids(&case["ids"]));
        let ours: Vec<u64> = t.labels.iter().map(|&l| u64::from(l != IGNORE_INDEX)).collect();
        let hf: Vec<u64> = case["assistant_masks"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        assert_eq!(ours, hf, "{}", case["text"]);
        compared += 1;
    }
    assert_eq!(compared, 3);
}

#[test]
fn mask_counts_assistant_content_and_end_of_turn() {
    let g = golden("chatml");
    let t = encode_conversation(&g, messages(&g.json["cases"][0]["messages"]));
    let shown = show_mask(&g.tok, &t).unwrap();
    println!("{shown}");
    assert_eq!(
        shown,
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of \
         France?<|im_end|>\n<|im_start|>assistant\n[[Paris.<|im_end|>]]\n<|im_start|>user\nAnd of \
         Italy?<|im_end|>\n<|im_start|>assistant\n[[Rome, of course.<|im_end|>]]\n"
    );

    // The Llama-3-style template trims content: the mask follows the trimmed text.
    let g = golden("llama3");
    let t = encode_conversation(&g, messages(&g.json["cases"][2]["messages"]));
    let shown = show_mask(&g.tok, &t).unwrap();
    println!("{shown}");
    assert_eq!(
        shown,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello, café!<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n[[Bonjour !<|eot_id|>]]"
    );
}
