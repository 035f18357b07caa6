//! taper-align's losses against TRL's formulas in PyTorch (scripts/golden/align_losses.py): values, and gradients
//! from candle's backward against torch autograd.

use candle_core::{Device, Tensor, Var};
use serde_json::Value;
use taper_align::losses::{
    bradley_terry, dpo_loss, gae, group_advantages, grpo_loss, kl_per_token, log_sigmoid, ppo_policy_loss,
    ppo_value_loss, whiten, DpoLoss, KlEstimator,
};
use taper_align::AlignError;

const REL: f64 = 1e-5;
const ABS: f64 = 1e-6;

fn fixture() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/align_losses.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_f64().unwrap()).collect()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= ABS + REL * want.abs()
}

fn assert_close(what: &str, got: f64, want: f64) {
    assert!(close(got, want), "{what}: got {got}, want {want} (diff {:e})", got - want);
}

fn assert_all_close(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g as f64, *w), "{what}[{i}]: got {g}, want {w}\n got {got:?}\nwant {want:?}");
    }
}

fn shape(c: &Value) -> (usize, usize) {
    let s = c["shape"].as_array().unwrap();
    (s[0].as_u64().unwrap() as usize, s[1].as_u64().unwrap() as usize)
}

fn tensor(v: &Value, shape: &[usize]) -> Tensor {
    Tensor::from_vec(f32s(v), shape, &Device::Cpu).unwrap()
}

fn var(v: &Value, shape: &[usize]) -> Var {
    Var::from_tensor(&tensor(v, shape)).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn grad(loss: &Tensor, v: &Var) -> Vec<f32> {
    let grads = loss.backward().unwrap();
    values(grads.get(v.as_tensor()).expect("no gradient reached the policy input"))
}

#[test]
fn bradley_terry_matches_trl() {
    for (i, c) in fixture()["bradley_terry"].as_array().unwrap().iter().enumerate() {
        let b = f32s(&c["chosen"]).len();
        let (chosen, rejected) = (var(&c["chosen"], &[b]), var(&c["rejected"], &[b]));
        let margin = (!c["margin"].is_null()).then(|| tensor(&c["margin"], &[b]));
        let out = bradley_terry(&chosen, &rejected, margin.as_ref(), num(&c["center_coef"])).unwrap();
        let what = format!("bradley_terry case {i}");
        assert_close(&format!("{what} loss"), scalar(&out.loss), num(&c["loss"]));
        assert_close(&format!("{what} accuracy"), out.accuracy, num(&c["accuracy"]));
        assert_close(&format!("{what} margin"), out.margin, num(&c["mean_margin"]));
        let grads = out.loss.backward().unwrap();
        assert_all_close(&format!("{what} d/dchosen"), &values(grads.get(&chosen).unwrap()), &f64s(&c["grad_chosen"]));
        assert_all_close(
            &format!("{what} d/drejected"),
            &values(grads.get(&rejected).unwrap()),
            &f64s(&c["grad_rejected"]),
        );
    }
}

#[test]
fn dpo_family_matches_trl() {
    for c in fixture()["dpo"].as_array().unwrap() {
        let kind: DpoLoss = serde_json::from_value(c["loss_kind"].clone()).unwrap();
        let b = f32s(&c["policy_chosen"]).len();
        let (pc, pr) = (var(&c["policy_chosen"], &[b]), var(&c["policy_rejected"], &[b]));
        let reference =
            (!c["ref_chosen"].is_null()).then(|| (tensor(&c["ref_chosen"], &[b]), tensor(&c["ref_rejected"], &[b])));
        let out = dpo_loss(kind, num(&c["beta"]), &pc, &pr, reference.as_ref().map(|(a, b)| (a, b))).unwrap();
        let what = format!("{kind:?}");
        assert_all_close(&format!("{what} losses"), &values(&out.losses), &f64s(&c["losses"]));
        assert_close(&format!("{what} loss"), scalar(&out.loss), num(&c["loss"]));
        let rewards = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        assert_all_close(&format!("{what} chosen_rewards"), &rewards(&out.chosen_rewards), &f64s(&c["chosen_rewards"]));
        assert_all_close(
            &format!("{what} rejected_rewards"),
            &rewards(&out.rejected_rewards),
            &f64s(&c["rejected_rewards"]),
        );
        let stats = out.stats.to_vec1::<f64>().unwrap();
        assert_close(&format!("{what} accuracy"), stats[0], num(&c["accuracy"]));
        assert_close(&format!("{what} margin"), stats[1], num(&c["margin"]));
        let grads = out.loss.backward().unwrap();
        assert_all_close(&format!("{what} d/dpc"), &values(grads.get(&pc).unwrap()), &f64s(&c["grad_policy_chosen"]));
        assert_all_close(&format!("{what} d/dpr"), &values(grads.get(&pr).unwrap()), &f64s(&c["grad_policy_rejected"]));
    }
}

#[test]
fn gae_matches_trl() {
    for (i, c) in fixture()["gae"].as_array().unwrap().iter().enumerate() {
        let (adv, ret) =
            gae(&f32s(&c["rewards"]), &f32s(&c["values"]), &f32s(&c["mask"]), num(&c["gamma"]), num(&c["lam"]))
                .unwrap();
        assert_all_close(&format!("gae case {i} advantages"), &adv, &f64s(&c["advantages"]));
        assert_all_close(&format!("gae case {i} returns"), &ret, &f64s(&c["returns"]));
    }
}

#[test]
fn whiten_matches_trl() {
    for c in fixture()["whiten"].as_array().unwrap() {
        let shift_mean = c["shift_mean"].as_bool().unwrap();
        let out = whiten(&f32s(&c["xs"]), &f32s(&c["mask"]), shift_mean).unwrap();
        assert_all_close(&format!("whiten shift_mean={shift_mean}"), &out, &f64s(&c["out"]));
    }
}

#[test]
fn kl_estimators_match_trl() {
    for c in fixture()["kl"].as_array().unwrap() {
        let est: KlEstimator = serde_json::from_value(c["est"].clone()).unwrap();
        let (b, t) = shape(c);
        let logp = var(&c["logp"], &[b, t]);
        let kl = kl_per_token(&logp, &tensor(&c["ref_logp"], &[b, t]), est).unwrap();
        assert_all_close(&format!("{est:?}"), &values(&kl), &f64s(&c["out"]));
        assert_all_close(&format!("{est:?} d/dlogp"), &grad(&kl.sum_all().unwrap(), &logp), &f64s(&c["grad_logp"]));
    }
}

#[test]
fn ppo_policy_loss_matches_trl() {
    for c in fixture()["ppo_policy"].as_array().unwrap() {
        let (b, t) = shape(c);
        let new = var(&c["logp_new"], &[b, t]);
        let out = ppo_policy_loss(
            &new,
            &tensor(&c["logp_old"], &[b, t]),
            &tensor(&c["advantages"], &[b, t]),
            &tensor(&c["mask"], &[b, t]),
            num(&c["clip_eps"]),
        )
        .unwrap();
        assert_close("ppo policy loss", scalar(&out.loss), num(&c["loss"]));
        assert_close("ppo clip_frac", out.clip_frac, num(&c["clip_frac"]));
        assert_close("ppo approx_kl", out.approx_kl, num(&c["approx_kl"]));
        assert!(out.clip_frac > 0.0 && out.clip_frac < 1.0, "the fixture should clip some tokens, not all");
        assert_all_close("ppo policy d/dlogp_new", &grad(&out.loss, &new), &f64s(&c["grad_logp_new"]));
    }
}

#[test]
fn ppo_value_loss_matches_trl() {
    for c in fixture()["ppo_value"].as_array().unwrap() {
        let (b, t) = shape(c);
        let v_new = var(&c["v_new"], &[b, t]);
        let (loss, clip_frac) = ppo_value_loss(
            &v_new,
            &tensor(&c["v_old"], &[b, t]),
            &tensor(&c["returns"], &[b, t]),
            &tensor(&c["mask"], &[b, t]),
            num(&c["clip"]),
        )
        .unwrap();
        assert_close("ppo value loss", scalar(&loss), num(&c["loss"]));
        assert_close("ppo value clip_frac", clip_frac, num(&c["clip_frac"]));
        assert_all_close("ppo value d/dv_new", &grad(&loss, &v_new), &f64s(&c["grad_v_new"]));
    }
}

#[test]
fn group_advantages_match_trl() {
    for c in fixture()["group_advantages"].as_array().unwrap() {
        let group = c["group"].as_u64().unwrap() as usize;
        let scale_std = c["scale_std"].as_bool().unwrap();
        let out = group_advantages(&f32s(&c["rewards"]), group, scale_std).unwrap();
        assert_all_close(&format!("group_advantages scale_std={scale_std}"), &out, &f64s(&c["out"]));
    }
}

#[test]
fn grpo_loss_matches_trl() {
    for c in fixture()["grpo"].as_array().unwrap() {
        let (b, t) = shape(c);
        let logp = var(&c["logp"], &[b, t]);
        let reference = (!c["ref_logp"].is_null()).then(|| tensor(&c["ref_logp"], &[b, t]));
        let out = grpo_loss(
            &logp,
            &tensor(&c["old_logp"], &[b, t]),
            reference.as_ref(),
            &tensor(&c["advantages"], &[b]),
            &tensor(&c["mask"], &[b, t]),
            num(&c["clip_eps"]),
            num(&c["beta"]),
        )
        .unwrap();
        let what = format!("grpo beta={} ref={}", c["beta"], reference.is_some());
        assert_close(&format!("{what} loss"), scalar(&out.loss), num(&c["loss"]));
        assert_close(&format!("{what} kl"), out.kl, num(&c["kl"]));
        assert_close(&format!("{what} clip_frac"), out.clip_frac, num(&c["clip_frac"]));
        assert_all_close(&format!("{what} d/dlogp"), &grad(&out.loss, &logp), &f64s(&c["grad_logp"]));
    }
}

fn vec1(xs: &[f32]) -> Tensor {
    Tensor::new(xs, &Device::Cpu).unwrap()
}

#[test]
fn label_smoothing_zero_is_plain_dpo() {
    let (pc, pr, rc, rr) = (vec1(&[-3.0, -7.5]), vec1(&[-4.0, -6.0]), vec1(&[-3.5, -7.0]), vec1(&[-3.8, -6.1]));
    let beta = 0.1;
    let out = dpo_loss(DpoLoss::Sigmoid { label_smoothing: 0.0 }, beta, &pc, &pr, Some((&rc, &rr))).unwrap();
    let logits = ((&pc - &pr).unwrap() - (&rc - &rr).unwrap()).unwrap();
    let plain = log_sigmoid(&(logits * beta).unwrap()).unwrap().neg().unwrap();
    assert_all_close("ls=0", &values(&out.losses), &values(&plain).iter().map(|&x| x as f64).collect::<Vec<_>>());
}

#[test]
fn dpo_at_zero_logits_is_ln2() {
    let pc = vec1(&[-3.0, -7.5, -1.0]);
    let pr = vec1(&[-4.0, -6.0, -2.0]);
    // A reference with the same log-ratios makes the logits exactly 0, whatever beta or the label smoothing.
    let (rc, rr) = ((&pc + 2.0).unwrap(), (&pr + 2.0).unwrap());
    for ls in [0.0, 0.2] {
        let out = dpo_loss(DpoLoss::Sigmoid { label_smoothing: ls }, 0.5, &pc, &pr, Some((&rc, &rr))).unwrap();
        assert_close(&format!("ls={ls}"), scalar(&out.loss), std::f64::consts::LN_2);
    }
}

#[test]
fn reference_is_required_exactly_when_the_loss_uses_one() {
    let (c, r) = (vec1(&[-1.0, -2.0]), vec1(&[-1.5, -2.5]));
    let simpo = DpoLoss::Simpo { gamma: 0.5 };
    assert!(matches!(dpo_loss(simpo, 2.0, &c, &r, Some((&c, &r))), Err(AlignError::Invalid(_))));
    assert!(dpo_loss(simpo, 2.0, &c, &r, None).is_ok());
    for kind in [DpoLoss::Sigmoid { label_smoothing: 0.0 }, DpoLoss::Ipo, DpoLoss::Hinge] {
        assert!(matches!(dpo_loss(kind, 0.1, &c, &r, None), Err(AlignError::Invalid(_))), "{kind:?}");
    }
    assert!(DpoLoss::Ipo.length_normalised() && simpo.length_normalised());
    assert!(!DpoLoss::Hinge.length_normalised() && !DpoLoss::Sigmoid { label_smoothing: 0.1 }.length_normalised());
}

#[test]
fn dpo_loss_config_round_trips() {
    let kinds: Vec<DpoLoss> = serde_json::from_str(
        r#"[{"kind": "sigmoid"}, {"kind": "sigmoid", "label_smoothing": 0.1}, {"kind": "ipo"}, {"kind": "hinge"},
            {"kind": "simpo"}, {"kind": "simpo", "gamma": 1.5}]"#,
    )
    .unwrap();
    assert_eq!(
        kinds,
        [
            DpoLoss::Sigmoid { label_smoothing: 0.0 },
            DpoLoss::Sigmoid { label_smoothing: 0.1 },
            DpoLoss::Ipo,
            DpoLoss::Hinge,
            DpoLoss::Simpo { gamma: 0.5 },
            DpoLoss::Simpo { gamma: 1.5 },
        ]
    );
    for k in &kinds {
        assert_eq!(&serde_json::from_value::<DpoLoss>(serde_json::to_value(k).unwrap()).unwrap(), k);
    }
    assert!(serde_json::from_str::<DpoLoss>(r#"{"kind": "sigmoid", "gamma": 0.5}"#).is_err());
    assert!(serde_json::from_str::<DpoLoss>(r#"{"kind": "ipo", "beta": 0.1}"#).is_err());
    assert!(serde_json::from_str::<DpoLoss>(r#"{"kind": "kto"}"#).is_err());
}

#[test]
fn gae_with_unit_gamma_lambda_and_zero_values_is_reward_to_go() {
    let rewards = [0.5, -1.0, 2.0, 0.25, 9.0];
    let mask = [1.0, 1.0, 1.0, 1.0, 0.0];
    let (adv, ret) = gae(&rewards, &[0.0; 5], &mask, 1.0, 1.0).unwrap();
    let want = [1.75, 1.25, 2.25, 0.25, 0.0];
    assert_eq!(adv, want);
    assert_eq!(ret, want);
}

#[test]
fn group_advantages_sum_to_zero_per_group() {
    let rewards = [0.1, 0.7, -0.3, 1.2, 5.0, 5.0, 4.0, 6.5, 0.0, 1.0, 1.0, 1.0];
    for scale_std in [true, false] {
        let adv = group_advantages(&rewards, 4, scale_std).unwrap();
        for g in adv.chunks(4) {
            assert!(g.iter().sum::<f32>().abs() < 1e-5, "scale_std={scale_std}: {g:?}");
        }
    }
    assert!(group_advantages(&rewards, 5, true).is_err());
}
