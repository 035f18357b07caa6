//! Chat templates against transformers' `apply_chat_template` (fixtures written by
//! scripts/golden/chat_templates.py): rendered strings, token ids, HF's assistant mask, and
//! `raise_exception` messages.

use serde_json::Value;
use std::path::{Path, PathBuf};
use taper_data::chat::{ChatTemplate, Message, Role, CHATML};
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
