//! Chat templates: Hugging Face `chat_template` Jinja rendered with minijinja under the same
//! semantics as transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, no autoescape,
//! `raise_exception`, a `tojson` that neither escapes HTML nor ASCII, Python string methods).

use crate::{io_err, DataError, Result};
use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, Error as JinjaError, ErrorKind, UndefinedBehavior};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

/// ChatML, for models trained from scratch: the tokenizer should carry [`CHATML_SPECIAL_TOKENS`]
/// as special tokens so that each marker is one token.
pub const CHATML: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The special tokens [`CHATML`] writes; `<|im_end|>` ends every turn and so is its eos.
pub const CHATML_SPECIAL_TOKENS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];

/// The names transformers passes to templates from `special_tokens_map`.
const SPECIAL_TOKEN_NAMES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

const TEMPLATE_NAME: &str = "chat_template";

/// A conversation role. Other roles (tool, function, ...) are rejected when reading data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
}

/// A rendered conversation and, for every message, the byte range of its content in `text`
/// (`None` for non-assistant messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub content_spans: Vec<Option<Range<usize>>>,
}

/// A compiled chat template plus the special-token strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    special_tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

fn template_err(e: &JinjaError) -> DataError {
    // raise_exception's message is the template author's, so it becomes its own variant.
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Raised>() {
            return DataError::TemplateRaised { message: r.0.clone() };
        }
        cur = err.source();
    }
    let mut reason = e.to_string();
    if let Some(line) = e.line() {
        if !reason.contains("line") {
            reason = format!("{reason} (line {line})");
        }
    }
    DataError::Template { reason }
}

#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

impl ChatTemplate {
    /// Compiles `source`. `special_tokens` maps names such as `bos_token` to token strings; they
    /// are template variables, as transformers passes them.
    pub fn new<K, V>(source: &str, special_tokens: impl IntoIterator<Item = (K, V)>) -> Result<Self>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| template_err(&e))?,
        );
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
        });
        env.add_function("strftime_now", |fmt: String| Value::from(strftime_now(&fmt)));
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source)).map_err(|e| template_err(&e))?;
        let special_tokens = special_tokens.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        Ok(Self { env, source: source.to_string(), special_tokens })
    }

    /// The built-in [`CHATML`] template, with `<|im_end|>` as its eos token.
    pub fn chatml() -> Self {
        Self::new(CHATML, [("eos_token", CHATML_SPECIAL_TOKENS[1])]).expect("the built-in ChatML template compiles")
    }

    /// Reads a model directory as transformers saves it: special tokens from
    /// `tokenizer_config.json`, the template from `chat_template.jinja` if present, else from
    /// the config's `chat_template` (a string, or a list of named templates: `default` is used).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() { read_json(&cfg_path)? } else { serde_json::Value::Null };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            std::fs::read_to_string(&jinja).map_err(io_err(&jinja))?
        } else {
            template_from_config(&cfg).ok_or_else(|| DataError::Template {
                reason: format!("{} has no chat template (no chat_template.jinja, no chat_template)", dir.display()),
            })?
        };
        Self::new(&source, special_tokens_from_config(&cfg))
    }

    /// Reads `tokenizer_config.json` alone (its `chat_template` and special tokens).
    pub fn from_tokenizer_config(path: &Path) -> Result<Self> {
        let cfg = read_json(path)?;
        let source = template_from_config(&cfg)
            .ok_or_else(|| DataError::Template { reason: format!("{} has no chat_template", path.display()) })?;
        Self::new(&source, special_tokens_from_config(&cfg))
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// A special token by its transformers name (`"eos_token"`, `"bos_token"`, ...).
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.get(name).map(String::as_str)
    }

    /// Renders `messages` as `apply_chat_template(..., tokenize=False)` would.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_values(messages, add_generation_prompt, None)
    }

    fn render_values(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        mark: Option<(char, char)>,
    ) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let content = match mark {
                    Some((open, close)) if m.role == Role::Assistant => format!("{open}{}{close}", m.content),
                    _ => m.content.clone(),
                };
                minijinja::context! { role => m.role.as_str(), content => content }
            })
            .collect();
        let mut ctx: BTreeMap<&str, Value> =
            self.special_tokens.iter().map(|(k, v)| (k.as_str(), Value::from(v.as_str()))).collect();
        ctx.insert("messages", Value::from(msgs));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(|e| template_err(&e))?;
        tmpl.render(ctx).map_err(|e| template_err(&e))
    }

    /// Renders `messages` and locates each assistant message's content in the result, so that a
    /// loss mask can be built from the tokenizer's offsets of this very string.
    ///
    /// The conversation is rendered a second time with each assistant content wrapped in
    /// private-use marker characters. If removing the markers gives the plain render, their
    /// positions are the spans. A template that transforms the content (`| trim`, `.strip()`)
    /// makes the two differ only inside the markers; the text between markers then anchors each
    /// content's transformed form in the plain render. A template whose output elsewhere depends
    /// on the content is an error rather than a guessed mask.
    pub fn render_with_spans(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Rendered> {
        let text = self.render(messages, add_generation_prompt)?;
        let n_assistant = messages.iter().filter(|m| m.role == Role::Assistant).count();
        if n_assistant == 0 {
            return Ok(Rendered { content_spans: vec![None; messages.len()], text });
        }
        let (open, close) = (0xF8F0u32..0xF8FF)
            .step_by(2)
            .map(|c| (char::from_u32(c).expect("private use"), char::from_u32(c + 1).expect("private use")))
            .find(|&(o, c)| !messages.iter().any(|m| m.content.contains([o, c])))
            .ok_or_else(|| DataError::Template { reason: "messages use every private-use marker character".into() })?;
        let marked = self.render_values(messages, add_generation_prompt, Some((open, close)))?;
        let lost = |why: &str| DataError::Template {
            reason: format!("cannot locate the assistant contents in the rendered conversation: {why}"),
        };
        let (stripped, spans) = strip_markers(&marked, open, close).ok_or_else(|| lost("the template splits them"))?;
        if spans.len() != n_assistant {
            return Err(lost(&format!("{} of {n_assistant} are rendered", spans.len())));
        }
        let spans = if stripped == text {
            spans
        } else {
            align_spans(&stripped, &spans, &text)
                .ok_or_else(|| lost("the template's output around them depends on their text"))?
        };
        let mut spans = spans.into_iter();
        let content_spans =
            messages.iter().map(|m| if m.role == Role::Assistant { spans.next() } else { None }).collect();
        Ok(Rendered { text, content_spans })
    }
}

/// Removes the markers from `marked`, returning the text and the spans they enclosed, or
/// `None` if they do not pair up.
fn strip_markers(marked: &str, open: char, close: char) -> Option<(String, Vec<Range<usize>>)> {
    let mut out = String::with_capacity(marked.len());
    let mut spans = Vec::new();
    let mut start = None;
    for c in marked.chars() {
        if c == open {
            if start.replace(out.len()).is_some() {
                return None;
            }
        } else if c == close {
            spans.push(start.take()?..out.len());
        } else {
            out.push(c);
        }
    }
    start.is_none().then_some((out, spans))
}

/// Maps spans of `marked` onto `plain`, assuming the two agree outside the spans: the text
/// between consecutive spans is found in `plain` in order, and what lies between is the span.
fn align_spans(marked: &str, spans: &[Range<usize>], plain: &str) -> Option<Vec<Range<usize>>> {
    let head = &marked[..spans[0].start];
    let tail = &marked[spans[spans.len() - 1].end..];
    if !plain.starts_with(head) || !plain.ends_with(tail) || plain.len() < head.len() + tail.len() {
        return None;
    }
    let body_end = plain.len() - tail.len();
    let mut pos = head.len();
    let mut out = Vec::with_capacity(spans.len());
    for (k, s) in spans.iter().enumerate() {
        let end = match spans.get(k + 1) {
            Some(next) => {
                let gap = &marked[s.end..next.start];
                // An empty gap cannot anchor anything: the boundary would be a guess.
                if gap.is_empty() {
                    return None;
                }
                pos + plain.get(pos..body_end)?.find(gap)?
            }
            None => body_end,
        };
        if end < pos {
            return None;
        }
        out.push(pos..end);
        pos = end + spans.get(k + 1).map_or(0, |next| next.start - s.end);
    }
    Some(out)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&s).map_err(|e| DataError::BadLine {
        path: path.display().to_string(),
        line: e.line(),
        reason: e.to_string(),
    })
}

fn template_from_config(cfg: &serde_json::Value) -> Option<String> {
    match cfg.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// Named special tokens from a tokenizer_config, whose values are either strings or
/// serialised `AddedToken`s (`{"content": ...}`).
pub fn special_tokens_from_config(cfg: &serde_json::Value) -> BTreeMap<String, String> {
    SPECIAL_TOKEN_NAMES
        .iter()
        .filter_map(|&name| {
            let v = cfg.get(name)?;
            let s = v.as_str().or_else(|| v.get("content")?.as_str())?;
            Some((name.to_string(), s.to_string()))
        })
        .collect()
}

/// Rewrites HF's `{% generation %}`/`{% endgeneration %}` (transformers' assistant-mask
/// extension, unknown to minijinja) into an always-true `if`, keeping the tags' whitespace
/// control so the output is unchanged.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = split_ws_control(inner, true);
        let (body, trail) = split_ws_control(body, false);
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn split_ws_control(s: &str, leading: bool) -> (&str, &str) {
    let is_ctl = |c: char| c == '-' || c == '+';
    if leading {
        match s.chars().next() {
            Some(c) if is_ctl(c) => (&s[..1], &s[1..]),
            _ => ("", s),
        }
    } else {
        match s.chars().last() {
            Some(c) if is_ctl(c) => (&s[..s.len() - 1], &s[s.len() - 1..]),
            _ => (s, ""),
        }
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`, so no HTML escaping and Python's separators.
fn tojson(value: &Value, kwargs: minijinja::value::Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v)?),
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => (a.to_string(), b.to_string()),
                _ => return Err(JinjaError::new(ErrorKind::InvalidOperation, "separators must be a pair")),
            }
        }
        _ => ((if indent.is_some() { "," } else { ", " }).to_string(), ": ".to_string()),
    };
    let fmt = PyJson { indent, item_sep, key_sep, ascii: ascii.unwrap_or(false) };
    let mut out = String::new();
    fmt.write(&mut out, value, sort_keys.unwrap_or(false), 0)?;
    Ok(Value::from(out))
}

struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ascii: bool,
}

impl PyJson {
    fn string(&self, out: &mut String, s: &str) {
        let json = serde_json::to_string(s).expect("strings serialise");
        if !self.ascii {
            out.push_str(&json);
            return;
        }
        for c in json.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }

    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, out: &mut String, v: &Value, sort: bool, depth: usize) -> std::result::Result<(), JinjaError> {
        use minijinja::value::ValueKind;
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if let Ok(i) = i128::try_from(v.clone()) {
                    out.push_str(&i.to_string());
                } else {
                    out.push_str(&py_float(f64::try_from(v.clone())?));
                }
            }
            ValueKind::String => self.string(out, v.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut pairs: Vec<(Value, Value)> =
                    v.try_iter()?.map(|k| (k.clone(), v.get_item(&k).unwrap_or_default())).collect();
                if sort {
                    pairs.sort_by(|a, b| a.0.cmp(&b.0));
                }
                if pairs.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, (k, val)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    let key = match k.as_str() {
                        Some(s) => s.to_string(),
                        None => k.to_string(),
                    };
                    self.string(out, &key);
                    out.push_str(&self.key_sep);
                    self.write(out, val, sort, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, item, sort, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            _ => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson cannot serialise a value of kind {}", v.kind()),
                ))
            }
        }
        Ok(())
    }
}

/// Python's `repr(float)` as `json.dumps` writes it: shortest round-trip digits, scientific
/// notation outside 1e-4 <= |x| < 1e16.
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// The subset of strftime that chat templates use for "today's date" lines, in UTC.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    format_time(secs, fmt)
}

fn format_time(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = DAYS[(days + 3).rem_euclid(7) as usize]; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Vec<Message> {
        vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello!"),
            Message::new(Role::User, "Bye"),
            Message::new(Role::Assistant, "  Bye.  "),
        ]
    }

    #[test]
    fn chatml_spans_by_markers() {
        let t = ChatTemplate::chatml();
        let r = t.render_with_spans(&conv(), false).unwrap();
        let spans: Vec<&str> = r.content_spans.iter().flatten().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(spans, ["Hello!", "  Bye.  "]);
        assert_eq!(r.content_spans.iter().filter(|s| s.is_none()).count(), 3);
        assert_eq!(t.special_token("eos_token"), Some("<|im_end|>"));
    }

    #[test]
    fn transformed_content_is_aligned() {
        let src = "{% for m in messages %}[{{ m.role }}]{{ m.content | trim }}\n{% endfor %}";
        let t = ChatTemplate::new(src, [("eos_token", "</s>")]).unwrap();
        // "assistant" also occurs in the header before the content: that one must not be taken.
        let msgs = vec![
            Message::new(Role::User, "user"),
            Message::new(Role::Assistant, " assistant "),
            Message::new(Role::User, "x"),
            Message::new(Role::Assistant, "\ny\n"),
        ];
        let r = t.render_with_spans(&msgs, false).unwrap();
        assert_eq!(r.text, "[user]user\n[assistant]assistant\n[user]x\n[assistant]y\n");
        let spans: Vec<_> = r.content_spans.iter().flatten().cloned().collect();
        assert_eq!(spans, [22..31, 51..52]);
        let upper = ChatTemplate::new("{% for m in messages %}<{{ m.content | upper }}>{% endfor %}", [("a", "b")]);
        let r = upper.unwrap().render_with_spans(&[Message::new(Role::Assistant, "hi")], false).unwrap();
        assert_eq!(&r.text[r.content_spans[0].clone().unwrap()], "HI");
    }

    #[test]
    fn content_dependent_template_is_an_error() {
        let src = "{% for m in messages %}{% if m.content.startswith('h') %}H{% endif %}[{{ m.content }}]{% endfor %}";
        let t = ChatTemplate::new(src, [("a", "b")]).unwrap();
        let err = t.render_with_spans(&[Message::new(Role::Assistant, "hi")], false).unwrap_err();
        assert!(matches!(err, DataError::Template { .. }), "{err}");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_typed() {
        let t = ChatTemplate::new("{{ raise_exception('no ' + messages[0].role) }}", [("a", "b")]).unwrap();
        match t.render(&[Message::new(Role::User, "x")], false) {
            Err(DataError::TemplateRaised { message }) => assert_eq!(message, "no user"),
            other => panic!("{other:?}"),
        }
        let err = ChatTemplate::new("{% for %}", [("a", "b")]).unwrap_err();
        assert!(matches!(err, DataError::Template { .. }), "{err}");
    }

    #[test]
    fn hf_builtins() {
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}\
                   {{ m.content.strip().startswith('a') }},{{ m.content.split(',') | tojson }},{% endfor %}\
                   {{ ns.n }}|{{ {'b': [1, 2.5, none, true], 'a': 'é<'} | tojson }}|\
                   {{ {'b': 1, 'a': {}} | tojson(indent=2, sort_keys=true) }}|{{ 'é😀' | tojson(ensure_ascii=true) }}";
        let t = ChatTemplate::new(src, [("a", "b")]).unwrap();
        let out = t.render(&[Message::new(Role::User, " a,b ")], false).unwrap();
        assert_eq!(
            out,
            "True,[\" a\", \"b \"],1|{\"b\": [1, 2.5, null, true], \"a\": \"é<\"}|{\n  \"a\": {},\n  \"b\": 1\n}|\"\\u00e9\\ud83d\\ude00\""
        );
    }

    #[test]
    fn generation_tags_keep_whitespace_control() {
        let src = "A {%- generation -%} B {% endgeneration %}\nC";
        assert_eq!(strip_generation_tags(src), "A {%- if true -%} B {% endif %}\nC");
        let t = ChatTemplate::new(src, [("a", "b")]).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "AB C");
    }

    #[test]
    fn loads_model_dirs_and_configs() {
        // transformers v5 layout: chat_template.jinja beside tokenizer_config.json.
        let hf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../taper-model/tests/fixtures/hf/llama");
        let t = ChatTemplate::from_model_dir(&hf).unwrap();
        assert_eq!((t.special_token("bos_token"), t.special_token("eos_token")), (Some("<s>"), Some("</s>")));
        assert_eq!(
            t.render(&[Message::new(Role::User, "x")], true).unwrap(),
            "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
        );

        // Older layout: named templates in the config, special tokens as AddedToken objects.
        let dir = std::env::temp_dir().join(format!("taper-chat-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = serde_json::json!({
            "bos_token": {"content": "<B>", "lstrip": false, "__type": "AddedToken"},
            "eos_token": "<E>",
            "additional_special_tokens": ["<X>"],
            "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ bos_token }}{{ eos_token }}"}],
        });
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::from_model_dir(&dir).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "<B><E>");
        std::fs::write(dir.join("tokenizer_config.json"), "{}").unwrap();
        assert!(matches!(ChatTemplate::from_model_dir(&dir), Err(DataError::Template { .. })));
        assert!(matches!(ChatTemplate::from_tokenizer_config(&dir.join("nope.json")), Err(DataError::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn python_float_repr_and_dates() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.1), "0.1");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(1.5e-7), "1.5e-07");
        assert_eq!(py_float(123456.789), "123456.789");
        // 2024-07-23 13:05:09 UTC, a Tuesday.
        assert_eq!(format_time(1_721_739_909, "%d %b %Y %A %H:%M:%S %%"), "23 Jul 2024 Tuesday 13:05:09 %");
    }
}
