//! Every shipped alignment config (configs/rm-*, dpo-*, grpo-*, ppo-*) parses and validates.

use taper_train::config::parse_as;

#[test]
fn every_alignment_config_parses() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if !p.is_file() {
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&p).unwrap();
        let origin = p.display().to_string();
        let parsed = match name.split('-').next().unwrap() {
            "rm" => parse_as::<taper_align::rm::RmConfig>(&text, &origin, &[]).map(|_| ()),
            "dpo" => parse_as::<taper_align::dpo::DpoConfig>(&text, &origin, &[]).map(|_| ()),
            "ppo" => parse_as::<taper_align::ppo::PpoConfig>(&text, &origin, &[]).map(|_| ()),
            "grpo" => parse_as::<taper_align::grpo::GrpoConfig>(&text, &origin, &[]).map(|_| ()),
            _ => continue,
        };
        if let Err(e) = parsed {
            panic!("{e}");
        }
        n += 1;
    }
    assert!(n >= 3, "found {n} alignment configs");
}
