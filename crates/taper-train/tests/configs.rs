//! Every shipped config parses and validates.

#[test]
fn every_config_in_configs_parses() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        // Alignment configs (rm-, dpo-, ppo-, grpo-) are taper-align's to check.
        let align = ["rm-", "dpo-", "ppo-", "grpo-"].iter().any(|k| name.starts_with(k));
        if p.extension().is_some_and(|x| x == "toml") && !align {
            let text = std::fs::read_to_string(&p).unwrap();
            let origin = p.display().to_string();
            // Fine-tuning configs start from a model (`init`); pretraining ones do not.
            let parsed = if text.lines().any(|l| l.trim_start().starts_with("init =")) {
                taper_train::config::parse_as::<taper_train::sft::SftConfig>(&text, &origin, &[]).map(|_| ())
            } else {
                taper_train::config::parse(&text, &origin, &[]).map(|_| ())
            };
            if let Err(e) = parsed {
                panic!("{e}");
            }
            n += 1;
        }
    }
    assert!(n >= 3, "found {n} configs");
}
