//! Range checks for config values. Each failure is one message that starts with the key (so
//! the config parser can point at the line or `--set` that gave it), then the value and what
//! is allowed. NaN and infinities fail every numeric check.

/// The broken rules of a config, collected so that every one is reported at once.
#[derive(Debug, Default)]
pub struct Rules(Vec<String>);

impl Rules {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, msg: impl Into<String>) {
        self.0.push(msg.into());
    }

    pub fn extend(&mut self, msgs: impl IntoIterator<Item = String>) {
        self.0.extend(msgs);
    }

    /// A value that must be given; `what` says what it names.
    pub fn required(&mut self, key: &str, v: &str, what: &str) {
        if v.trim().is_empty() {
            self.push(format!("{key}: name {what}"));
        }
    }

    /// A count that must be at least 1.
    pub fn at_least_one(&mut self, key: &str, v: u64) {
        if v == 0 {
            self.push(format!("{key} = 0: must be at least 1"));
        }
    }

    /// A finite number > 0.
    pub fn positive(&mut self, key: &str, v: f64) {
        if !(v.is_finite() && v > 0.0) {
            self.push(format!("{key} = {v}: must be a finite number > 0"));
        }
    }

    /// A finite number >= 0.
    pub fn non_negative(&mut self, key: &str, v: f64) {
        if !(v.is_finite() && v >= 0.0) {
            self.push(format!("{key} = {v}: must be a finite number >= 0"));
        }
    }

    /// A number in [0, 1) (`upper_closed` false) or [0, 1] (true).
    pub fn unit(&mut self, key: &str, v: f64, upper_closed: bool) {
        let ok = v >= 0.0 && if upper_closed { v <= 1.0 } else { v < 1.0 };
        if !ok {
            let range = if upper_closed { "[0, 1]" } else { "[0, 1)" };
            self.push(format!("{key} = {v}: must be in {range}"));
        }
    }

    /// A number in (0, 1) (`upper_closed` false) or (0, 1] (true).
    pub fn open_unit(&mut self, key: &str, v: f64, upper_closed: bool) {
        let ok = v > 0.0 && if upper_closed { v <= 1.0 } else { v < 1.0 };
        if !ok {
            let range = if upper_closed { "(0, 1]" } else { "(0, 1)" };
            self.push(format!("{key} = {v}: must be in {range}"));
        }
    }

    /// A string from a fixed set.
    pub fn one_of(&mut self, key: &str, v: &str, allowed: &[&str]) {
        if !allowed.contains(&v) {
            let list: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
            self.push(format!("{key} = {v:?}: expected {}", list.join(" or ")));
        }
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_and_infinity_fail_every_numeric_rule() {
        let mut r = Rules::new();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            r.positive("a", v);
            r.non_negative("b", v);
            r.unit("c", v, true);
            r.open_unit("d", v, true);
        }
        assert_eq!(r.into_vec().len(), 12);
        let mut r = Rules::new();
        r.positive("optim.lr", 1e-3);
        r.non_negative("x", 0.0);
        r.unit("y", 0.0, false);
        r.open_unit("z", 1.0, true);
        r.at_least_one("n", 1);
        assert!(r.into_vec().is_empty());
        let mut r = Rules::new();
        r.at_least_one("train.log_every", 0);
        assert_eq!(r.into_vec(), ["train.log_every = 0: must be at least 1"]);
    }
}
