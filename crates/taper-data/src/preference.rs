//! Alignment data in TRL's formats.
//!
//! Preference records (reward modelling, DPO), one per JSONL line or Parquet row:
//! - `{"prompt": "...", "chosen": "...", "rejected": "..."}`
//! - `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`
//! - `{"chosen": [messages], "rejected": [messages]}`: the prompt is implicit, the leading
//!   messages the two share;
//! - `{"chosen": "...", "rejected": "..."}`: the prompt is the leading text they share (as
//!   TRL's `extract_prompt`: a space before the first difference goes to the completions).
//!
//! Prompt records (PPO, GRPO): `{"prompt": "..." | [messages], "answer": "..."}` with `answer`
//! optional (the verifiable reward's reference). An SFT record serves too: `messages` ending
//! with an assistant turn, or `prompt`/`completion`; the response becomes the answer.

use crate::chat::{ChatTemplate, Message, Role};
use crate::sft::{parse_messages, parse_record, read_records, Example, OnBadRecord, Records};
use crate::{DataError, Result};
use serde_json::Value;
use std::path::PathBuf;

/// A preferred and a dispreferred response to the same prompt, each a full example whose loss
/// tokens are its response.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub chosen: Example,
    pub rejected: Example,
    /// How much better chosen is (the record's `margin`, for the reward model's loss).
    pub margin: Option<f64>,
}

/// A prompt as plain text or as the conversation so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Message>),
}

impl Prompt {
    /// The text a model continues: plain text as is, a conversation through the template
    /// with the generation prompt (the assistant header).
    pub fn render(&self, template: &ChatTemplate) -> Result<String> {
        match self {
            Prompt::Text(t) => Ok(t.clone()),
            Prompt::Chat(m) => template.render(m, true),
        }
    }

    /// The full example of this prompt answered with `response`, loss on the response.
    pub fn with_response(&self, response: &str) -> Example {
        match self {
            Prompt::Text(p) => Example::PromptCompletion { prompt: p.clone(), completion: response.to_string() },
            Prompt::Chat(m) => {
                let mut messages = m.clone();
                messages.push(Message { role: Role::Assistant, content: response.to_string() });
                Example::Conversation { train_from: m.len(), messages }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRecord {
    pub prompt: Prompt,
    /// The reference answer, for verifiable rewards and exact match.
    pub answer: Option<String>,
}

impl Example {
    /// The prompt and reference response of a prompt/completion or a conversation ending with
    /// an assistant turn; `None` for plain text.
    pub fn split_prompt(&self) -> Option<(Prompt, String)> {
        match self {
            Example::PromptCompletion { prompt, completion } => {
                Some((Prompt::Text(prompt.clone()), completion.clone()))
            }
            Example::Conversation { messages, .. } => match messages.split_last() {
                Some((last, rest)) if last.role == Role::Assistant && !rest.is_empty() => {
                    Some((Prompt::Chat(rest.to_vec()), last.content.clone()))
                }
                _ => None,
            },
            Example::Text(_) => None,
        }
    }
}

pub fn read_pairs(paths: &[PathBuf], on_bad: OnBadRecord) -> Result<Records<Pair>> {
    read_records(paths, on_bad, parse_pair)
}

pub fn read_prompts(paths: &[PathBuf], on_bad: OnBadRecord) -> Result<Records<PromptRecord>> {
    read_records(paths, on_bad, parse_prompt)
}

/// The index of the first character where `a` and `b` differ, stepped back over one space
/// (TRL's `extract_prompt`), as a byte offset valid in both.
fn shared_text_prefix(a: &str, b: &str) -> usize {
    let mut end = 0;
    let mut prev_space = false;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            return if prev_space { i - 1 } else { i };
        }
        prev_space = ca == ' ';
        end = i + ca.len_utf8();
    }
    end
}

/// Parses one preference record; `path` and `line` name it in errors.
pub fn parse_pair(v: &Value, path: &str, line: usize) -> Result<Pair> {
    let bad = |reason: String| DataError::BadLine { path: path.to_string(), line, reason };
    let obj = v.as_object().ok_or_else(|| bad("a record must be a JSON object".into()))?;
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());
    let (chosen, rejected) = match (field("chosen"), field("rejected")) {
        (Some(c), Some(r)) => (c, r),
        _ => return Err(bad("a preference record needs `chosen` and `rejected`".into())),
    };
    let margin = match field("margin") {
        None => None,
        Some(m) => Some(m.as_f64().ok_or_else(|| bad("`margin` must be a number".into()))?),
    };
    let mut pair = match (field("prompt"), chosen, rejected) {
        (Some(Value::String(p)), Value::String(c), Value::String(r)) => Pair {
            chosen: Example::PromptCompletion { prompt: p.clone(), completion: c.clone() },
            rejected: Example::PromptCompletion { prompt: p.clone(), completion: r.clone() },
            margin: None,
        },
        (Some(p @ Value::Array(_)), c @ Value::Array(_), r @ Value::Array(_)) => {
            let prompt = parse_messages(p, "prompt", path, line)?;
            let side = |v: &Value, name: &str| -> Result<Example> {
                let mut messages = prompt.clone();
                messages.extend(parse_messages(v, name, path, line)?);
                Ok(Example::Conversation { messages, train_from: prompt.len() })
            };
            Pair { chosen: side(c, "chosen")?, rejected: side(r, "rejected")?, margin: None }
        }
        (None, Value::String(c), Value::String(r)) => {
            let n = shared_text_prefix(c, r);
            let prompt = c[..n].to_string();
            Pair {
                chosen: Example::PromptCompletion { prompt: prompt.clone(), completion: c[n..].to_string() },
                rejected: Example::PromptCompletion { prompt, completion: r[n..].to_string() },
                margin: None,
            }
        }
        (None, c @ Value::Array(_), r @ Value::Array(_)) => {
            let c = parse_messages(c, "chosen", path, line)?;
            let r = parse_messages(r, "rejected", path, line)?;
            let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            Pair {
                chosen: Example::Conversation { messages: c, train_from: shared },
                rejected: Example::Conversation { messages: r, train_from: shared },
                margin: None,
            }
        }
        _ => {
            return Err(bad(
                "`prompt`, `chosen` and `rejected` must all be strings or all be message lists (prompt optional)"
                    .into(),
            ))
        }
    };
    for (name, side) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
        let empty = match side {
            Example::PromptCompletion { completion, .. } => completion.trim().is_empty(),
            Example::Conversation { messages, train_from } => {
                let response = &messages[*train_from..];
                if !response.iter().any(|m| m.role == Role::Assistant) {
                    return Err(DataError::NoAssistant { path: path.to_string(), line });
                }
                response.iter().all(|m| m.content.trim().is_empty())
            }
            Example::Text(_) => unreachable!("pairs are built from prompts and completions"),
        };
        if empty {
            return Err(bad(format!("the {name} completion is empty")));
        }
    }
    pair.margin = margin;
    if pair.chosen == pair.rejected {
        return Err(bad("`chosen` and `rejected` are identical: the pair prefers nothing".into()));
    }
    Ok(pair)
}

/// Parses one prompt record (or an SFT record, its response taken as the answer).
pub fn parse_prompt(v: &Value, path: &str, line: usize) -> Result<PromptRecord> {
    let bad = |reason: String| DataError::BadLine { path: path.to_string(), line, reason };
    let obj = v.as_object().ok_or_else(|| bad("a record must be a JSON object".into()))?;
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());
    let answer = match field("answer") {
        None => None,
        Some(Value::String(a)) => Some(a.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(bad("`answer` must be a string or a number".into())),
    };
    if field("completion").is_none() {
        match field("prompt") {
            Some(Value::String(p)) => return Ok(PromptRecord { prompt: Prompt::Text(p.clone()), answer }),
            Some(p @ Value::Array(_)) => {
                let m = parse_messages(p, "prompt", path, line)?;
                return Ok(PromptRecord { prompt: Prompt::Chat(m), answer });
            }
            Some(_) => return Err(bad("`prompt` must be a string or a message list".into())),
            None if field("messages").is_none() => {
                return Err(bad("a prompt record needs `prompt` (or an SFT `messages` record)".into()))
            }
            None => {}
        }
    }
    let (prompt, response) = parse_record(v, path, line)?
        .split_prompt()
        .ok_or_else(|| bad("`messages` must end with an assistant turn after the prompt".into()))?;
    Ok(PromptRecord { prompt, answer: answer.or(Some(response)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pair(v: Value) -> Result<Pair> {
        parse_pair(&v, "p.jsonl", 3)
    }

    #[test]
    fn explicit_and_implicit_prompts() {
        let p = pair(json!({"prompt": "2+2=", "chosen": "4", "rejected": "5"})).unwrap();
        assert_eq!(p.chosen, Example::PromptCompletion { prompt: "2+2=".into(), completion: "4".into() });
        let p = pair(json!({"chosen": "The sky is blue.", "rejected": "The sky is green."})).unwrap();
        assert_eq!(p.rejected, Example::PromptCompletion { prompt: "The sky is".into(), completion: " green.".into() });
        let user = json!({"role": "user", "content": "hi"});
        let a = |c: &str| json!({"role": "assistant", "content": c});
        let p = pair(json!({"chosen": [user, a("hello")], "rejected": [user, a("go away")]})).unwrap();
        match p.chosen {
            Example::Conversation { train_from, messages } => assert_eq!((train_from, messages.len()), (1, 2)),
            e => panic!("{e:?}"),
        }
        let p = pair(json!({"prompt": [user], "chosen": [a("hello")], "rejected": [a("bye")]})).unwrap();
        assert!(matches!(p.rejected, Example::Conversation { train_from: 1, .. }));
    }

    #[test]
    fn bad_pairs_are_named() {
        let err = |v: Value| pair(v).unwrap_err().to_string();
        assert_eq!(
            err(json!({"prompt": "q", "chosen": "a", "rejected": "a"})),
            "p.jsonl:3: `chosen` and `rejected` are identical: the pair prefers nothing"
        );
        assert!(err(json!({"prompt": "q", "chosen": " ", "rejected": "a"})).contains("chosen completion is empty"));
        assert!(err(json!({"prompt": "q", "chosen": "a"})).contains("needs `chosen` and `rejected`"));
        assert!(err(json!({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}))
            .contains("all be strings or all be message lists"));
        let user = json!({"role": "user", "content": "hi"});
        assert!(err(json!({"chosen": [user], "rejected": [user, {"role": "user", "content": "x"}]}))
            .contains("no assistant turn"));
    }

    #[test]
    fn prompts_from_prompt_or_sft_records() {
        let r = parse_prompt(&json!({"prompt": "2+2=", "answer": 4}), "f", 1).unwrap();
        assert_eq!(r, PromptRecord { prompt: Prompt::Text("2+2=".into()), answer: Some("4".into()) });
        let m = json!({"messages": [{"role": "user", "content": "upper: ab"}, {"role": "assistant", "content": "AB"}]});
        let r = parse_prompt(&m, "f", 1).unwrap();
        assert_eq!(r.answer.as_deref(), Some("AB"));
        assert!(matches!(r.prompt, Prompt::Chat(ref m) if m.len() == 1));
        let r = parse_prompt(&json!({"prompt": "a", "completion": "b"}), "f", 1).unwrap();
        assert_eq!(r.answer.as_deref(), Some("b"));
        assert!(parse_prompt(&json!({"text": "x"}), "f", 2).unwrap_err().to_string().contains("f:2"));
    }
}
