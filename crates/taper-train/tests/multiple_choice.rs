//! Multiple-choice scoring against lm-evaluation-harness: every choice's log-likelihood from
//! lm_eval's HFLM on the HF fixture models (scripts/golden/mc_lm_eval.py) within 1e-4, and
//! each question's acc and acc_norm exactly.

use candle_core::Device;
use std::path::{Path, PathBuf};
use taper_model::{Decoder, Weights};
use taper_train::multiple_choice::{self, McModel};
use taper_train::source;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn check(model: &str, batch_size: usize) {
    let dir = root().join("crates/taper-model/tests/fixtures/hf").join(model);
    let src = source::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let decoder = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config).unwrap();
    let m =
        McModel { model: &decoder, tokenizer: &src.tokenizer, prefix_id: multiple_choice::prefix_id(&src).unwrap() };
    let fixtures = root().join("crates/taper-train/tests/fixtures/mc");
    let task = multiple_choice::load_task(&fixtures.join("tiny.jsonl")).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join(format!("{model}_lm_eval.json"))).unwrap())
            .unwrap();
    let r = multiple_choice::score_task(&m, &task, batch_size, 0).unwrap();
    let want = golden["questions"].as_array().unwrap();
    assert_eq!(r.scored.len(), want.len());
    for (got, want) in r.scored.iter().zip(want) {
        let lls: Vec<f64> = want["lls"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.lls.len(), lls.len(), "{}", want["id"]);
        for (g, w) in got.lls.iter().zip(&lls) {
            assert!((g - w).abs() < 1e-4, "{model} {}: ll {g} vs lm_eval's {w}", want["id"]);
        }
        assert_eq!(got.acc, want["acc"].as_f64().unwrap(), "{model} {}", want["id"]);
        assert_eq!(got.acc_norm, want["acc_norm"].as_f64().unwrap(), "{model} {}", want["id"]);
    }
    let s = &golden["summary"];
    assert_eq!(r.acc, s["acc"].as_f64().unwrap());
    assert_eq!(r.acc_norm, s["acc_norm"].as_f64().unwrap());
    assert!((r.acc_stderr.unwrap() - s["acc_stderr"].as_f64().unwrap()).abs() < 1e-12);
    assert!((r.acc_norm_stderr.unwrap() - s["acc_norm_stderr"].as_f64().unwrap()).abs() < 1e-12);
}

#[test]
fn gpt2_fixture_scores_as_lm_eval() {
    // Batches of 3 rows: the five-choice question and the long context share forwards with
    // others, so padding is exercised.
    check("gpt2", 3);
}

#[test]
fn llama_fixture_scores_as_lm_eval() {
    check("llama", 16);
}

#[test]
fn the_continuation_takes_the_contexts_trailing_whitespace() {
    let dir = root().join("crates/taper-model/tests/fixtures/hf/gpt2");
    let src = source::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let enc = |s: &str| src.tokenizer.encode(s, false).unwrap().get_ids().to_vec();
    let r = multiple_choice::request(&src.tokenizer, 7, "The king rode to the ", " castle").unwrap();
    assert_eq!(r.context, enc("The king rode to the"));
    let whole = enc("The king rode to the  castle");
    assert_eq!(r.continuation, whole[r.context.len()..].to_vec());
    let r = multiple_choice::request(&src.tokenizer, 7, "", " castle").unwrap();
    assert_eq!((r.context, r.continuation), (vec![7], enc(" castle")));
}
