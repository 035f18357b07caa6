//! Every shipped config parses and validates.

#[test]
fn every_config_in_configs_parses() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(&p).unwrap();
            if let Err(e) = taper_train::config::parse(&text, &p.display().to_string(), &[]) {
                panic!("{e}");
            }
            n += 1;
        }
    }
    assert!(n >= 3, "found {n} configs");
}
