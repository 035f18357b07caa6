//! Reading TRL-format SFT files, tokenising them with a loss mask, and packing the result.

use std::path::{Path, PathBuf};
use taper_data::chat::{ChatTemplate, Message, Role, CHATML};
use taper_data::packing::{pack, padded_batches};
use taper_data::sft::{
    parse_record, read_sft, show_mask, EncodeOptions, Example, OnBadRecord, Overflow, SftEncoder, IGNORE_INDEX,
};
use taper_data::{tokenizer, DataError};
use tokenizers::Tokenizer;

fn tok() -> Tokenizer {
    tokenizer::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chatml/tokenizer.json")).unwrap()
}

/// ChatML with `</s>` as eos, as a fine-tuned base model would have.
fn template() -> ChatTemplate {
    ChatTemplate::new(CHATML, [("bos_token", "<s>"), ("eos_token", "</s>")]).unwrap()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("taper-sft-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const GOOD: &str = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
{"prompt": "The sky is", "completion": " blue."}

{"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}
{"text": "To be, or not to be."}
"#;

#[test]
fn reads_all_four_formats() {
    let d = TempDir::new("formats");
    let f = d.write("a.jsonl", GOOD);
    let data = read_sft(&[f], OnBadRecord::Error).unwrap();
    assert_eq!(data.skipped, 0);
    let lines: Vec<usize> = data.examples.iter().map(|e| e.line).collect();
    assert_eq!(lines, [1, 2, 4, 5]);
    assert!(
        matches!(&data.examples[0].example, Example::Conversation { messages, train_from: 0 } if messages.len() == 3)
    );
    assert_eq!(
        data.examples[1].example,
        Example::PromptCompletion { prompt: "The sky is".into(), completion: " blue.".into() }
    );
    assert_eq!(
        data.examples[2].example,
        Example::Conversation {
            messages: vec![Message::new(Role::User, "2+2?"), Message::new(Role::Assistant, "4")],
            train_from: 1
        }
    );
    assert_eq!(data.examples[3].example, Example::Text("To be, or not to be.".into()));
}

#[test]
fn bad_records_name_file_line_and_role_or_are_skipped() {
    let d = TempDir::new("bad");
    let bad = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"tool\", \"content\": \"b\"}]}\n\
               not json\n\
               {\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n\
               {\"prompt\": [{\"role\": \"user\", \"content\": \"q\"}], \"completion\": [{\"role\": \"user\", \"content\": \"q2\"}]}\n\
               {\"prompt\": \"p\"}\n\
               {\"text\": \"fine\"}\n";
    let f = d.write("sub/bad.jsonl", bad);
    let path = f.display().to_string();
    match read_sft(std::slice::from_ref(&f), OnBadRecord::Error) {
        Err(DataError::BadRole { path: p, line: 1, role }) => assert_eq!((p, role.as_str()), (path.clone(), "tool")),
        other => panic!("{other:?}"),
    }
    let msg = read_sft(std::slice::from_ref(&f), OnBadRecord::Error).unwrap_err().to_string();
    assert!(msg.contains(&format!("{path}:1")) && msg.contains("\"tool\""), "{msg}");

    // A directory is read recursively; bad records are counted and their errors kept.
    d.write("good.jsonl", GOOD);
    d.write("ignored.txt", "not a dataset");
    let data = read_sft(std::slice::from_ref(&d.0), OnBadRecord::Skip).unwrap();
    assert_eq!(data.examples.len(), 5);
    assert_eq!(data.skipped, 5);
    let reasons: Vec<String> = data.skip_reasons.iter().map(|e| e.to_string()).collect();
    assert!(reasons[1].contains(":2: not valid JSON"), "{reasons:?}");
    assert!(matches!(data.skip_reasons[2], DataError::NoAssistant { line: 3, .. }));
    assert!(matches!(data.skip_reasons[3], DataError::NoAssistant { line: 4, .. }));
    assert!(reasons[4].contains("`prompt` without `completion`"), "{reasons:?}");

    assert!(read_sft(&[d.0.join("missing.jsonl")], OnBadRecord::Skip).is_err());
    let empty = TempDir::new("empty");
    assert!(matches!(read_sft(std::slice::from_ref(&empty.0), OnBadRecord::Skip), Err(DataError::Dataset { .. })));
}

#[test]
fn record_shapes_are_checked() {
    let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    let err = |s: &str| parse_record(&v(s), "f.jsonl", 7).unwrap_err().to_string();
    assert!(err(r#"[1]"#).contains("f.jsonl:7: a record must be a JSON object"));
    assert!(err(r#"{"messages": []}"#).contains("`messages` is empty"));
    assert!(err(r#"{"messages": [{"role": "user", "content": null}]}"#).contains("content is not a string"));
    assert!(err(r#"{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}"#).contains("both"));
    assert!(err(r#"{"text": 3}"#).contains("not a string"));
    assert!(err(r#"{"other": 3}"#).contains("no `messages`"));
}

#[test]
fn masks_per_format() {
    let (tok, tpl) = (tok(), template());
    let enc = SftEncoder::new(&tok, &tpl, EncodeOptions::default()).unwrap();
    let eos = tok.token_to_id("</s>").unwrap();
    assert_eq!(enc.eos_id(), Some(eos));
    let show = |ex: &Example| show_mask(&tok, &enc.encode(ex).unwrap()).unwrap();

    let pc = Example::PromptCompletion { prompt: "The sky is".into(), completion: " blue.".into() };
    assert_eq!(show(&pc), "The sky is[[ blue.</s>]]");

    let text = enc.encode(&Example::Text("To be.".into())).unwrap();
    assert_eq!(*text.input_ids.last().unwrap(), eos);
    assert_eq!(text.labels[0], IGNORE_INDEX);
    assert!(text.labels[1..].iter().zip(&text.input_ids[1..]).all(|(&l, &i)| l == i64::from(i)));

    // Conversational prompt-completion: the prompt's assistant turn does not count.
    let conv = Example::Conversation {
        messages: vec![
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Yes?"),
            Message::new(Role::User, "Bye"),
            Message::new(Role::Assistant, "Bye."),
        ],
        train_from: 2,
    };
    assert_eq!(
        show(&conv),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYes?<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
         <|im_start|>assistant\n[[Bye.<|im_end|>]]\n"
    );

    let all = SftEncoder::new(&tok, &tpl, EncodeOptions { train_on_all: true, ..Default::default() }).unwrap();
    let t = all.encode(&conv).unwrap();
    assert_eq!(t.loss_tokens(), t.len() - 1);
}

#[test]
fn truncation_and_dropping_are_counted() {
    let (tok, tpl) = (tok(), template());
    let d = TempDir::new("trunc");
    let f = d.write("a.jsonl", GOOD);
    let data = read_sft(&[f], OnBadRecord::Error).unwrap();
    let full = SftEncoder::new(&tok, &tpl, EncodeOptions::default()).unwrap();
    let (all, stats) = full.encode_all(&data.examples).unwrap();
    assert_eq!((stats.kept, stats.truncated, stats.dropped_too_long), (4, 0, 0));
    assert_eq!(stats.tokens, all.iter().map(|t| t.len()).sum::<usize>());
    let lens: Vec<usize> = all.iter().map(|t| t.len()).collect();
    // Prompt-completion and text examples are short; the two conversations are longer.
    let cut = lens[1].max(lens[3]);
    assert!(lens[0] > cut && lens[2] > cut, "{lens:?}");

    let opts = |overflow| EncodeOptions { max_len: Some(cut), overflow, ..Default::default() };
    let (kept, stats) = SftEncoder::new(&tok, &tpl, opts(Overflow::Drop)).unwrap().encode_all(&data.examples).unwrap();
    assert_eq!((stats.kept, stats.dropped_too_long), (2, 2));
    assert!(kept.iter().all(|t| t.len() <= cut));

    // Truncated conversations lose their (late) assistant tokens, so they are dropped as
    // having nothing to learn from, unless some response token survives.
    let (kept, stats) =
        SftEncoder::new(&tok, &tpl, opts(Overflow::Truncate)).unwrap().encode_all(&data.examples).unwrap();
    assert_eq!(stats.truncated, 2);
    assert_eq!(stats.kept + stats.dropped_no_loss, 4);
    assert!(kept.iter().all(|t| t.len() <= cut && t.loss_tokens() > 0));
    assert!(SftEncoder::new(&tok, &tpl, EncodeOptions { max_len: Some(0), ..Default::default() }).is_err());
}

#[test]
fn template_errors_name_the_record_or_are_skipped() {
    let tok = tok();
    let tpl = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}\
         {% for m in messages %}{{ m.content }}</s>{% endfor %}",
        [("eos_token", "</s>")],
    )
    .unwrap();
    let d = TempDir::new("raise");
    let f = d.write(
        "a.jsonl",
        "{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n",
    );
    let data = read_sft(std::slice::from_ref(&f), OnBadRecord::Error).unwrap();
    let err = SftEncoder::new(&tok, &tpl, EncodeOptions::default()).unwrap().encode_all(&data.examples).unwrap_err();
    assert_eq!(err.to_string(), format!("{}:1: chat template raised: user first", f.display()));
    let skip = EncodeOptions { on_bad: OnBadRecord::Skip, ..Default::default() };
    let (kept, stats) = SftEncoder::new(&tok, &tpl, skip).unwrap().encode_all(&data.examples).unwrap();
    assert_eq!((kept.len(), stats.skipped_errors), (1, 1));
    assert_eq!(show_mask(&tok, &kept[0]).unwrap(), "q</s>[[a</s>]]");
}

#[test]
fn read_tokenise_pack() {
    let (tok, tpl) = (tok(), template());
    let d = TempDir::new("pack");
    let f = d.write("a.jsonl", &GOOD.repeat(5));
    let data = read_sft(&[f], OnBadRecord::Error).unwrap();
    let enc = SftEncoder::new(&tok, &tpl, EncodeOptions { max_len: Some(128), ..Default::default() }).unwrap();
    let (exs, _) = enc.encode_all(&data.examples).unwrap();
    let pad = tok.token_to_id("</s>").unwrap();
    let rows = pack(&exs, 128, pad).unwrap();
    let tokens: usize = exs.iter().map(|t| t.len()).sum();
    assert_eq!(rows.iter().map(|r| r.segment_ids.iter().filter(|&&s| s > 0).count()).sum::<usize>(), tokens);
    assert_eq!(
        rows.iter().map(|r| r.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()).sum::<usize>(),
        exs.iter().map(|t| t.loss_tokens()).sum::<usize>()
    );
    let batches = padded_batches(&exs, 4, pad, 8).unwrap();
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), exs.len());
}

/// Files written by pyarrow (scripts/golden/sft_parquet.py), as `datasets` would.
#[cfg(feature = "parquet")]
#[test]
fn reads_parquet() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let messages = dir.join("sft_messages.parquet");
    match read_sft(std::slice::from_ref(&messages), OnBadRecord::Error) {
        Err(DataError::BadRole { line: 3, role, .. }) => assert_eq!(role, "tool"),
        other => panic!("{other:?}"),
    }
    let data = read_sft(&[messages, dir.join("sft_mixed.parquet")], OnBadRecord::Skip).unwrap();
    assert_eq!(data.skipped, 1);
    let got: Vec<&Example> = data.examples.iter().map(|e| &e.example).collect();
    assert_eq!(
        got,
        [
            &Example::Conversation {
                messages: vec![
                    Message::new(Role::System, "Be brief."),
                    Message::new(Role::User, "Hi"),
                    Message::new(Role::Assistant, "Hello.")
                ],
                train_from: 0
            },
            &Example::Conversation {
                messages: vec![Message::new(Role::User, "2+2?"), Message::new(Role::Assistant, "4")],
                train_from: 0
            },
            &Example::Conversation {
                messages: vec![Message::new(Role::User, "Name a colour."), Message::new(Role::Assistant, "Red.")],
                train_from: 1
            },
            &Example::Text("To be, or not to be.".into()),
        ]
    );
    let bogus = TempDir::new("parquet");
    let f = bogus.write("x.parquet", "PAR1 not really");
    assert!(matches!(read_sft(&[f], OnBadRecord::Skip), Err(DataError::Dataset { .. })));
}

#[test]
fn end_of_turn_after_whitespace_counts() {
    let tok = tok();
    let tpl = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'user' %}<s>[INST] {{ m.content }} [/INST]\
         {% else %} {{ m.content }} </s>{% endif %}{% endfor %}",
        [("eos_token", "</s>")],
    )
    .unwrap();
    let enc = SftEncoder::new(&tok, &tpl, EncodeOptions::default()).unwrap();
    let conv = Example::Conversation {
        messages: vec![Message::new(Role::User, "Hi"), Message::new(Role::Assistant, "Hello")],
        train_from: 0,
    };
    let shown = show_mask(&tok, &enc.encode(&conv).unwrap()).unwrap();
    println!("{shown}");
    // The space before the content is template text; the one before </s> leads to the end token.
    assert_eq!(shown, "<s>[INST] Hi [/INST] [[Hello </s>]]");
}
