//! Config parsing: any text either fails with an error (no panic) or gives a
//! Config whose `to_toml()` reads back to the same Config. Also durations: any
//! text either fails or gives a duration that formats and parses back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockpool::config::{format_duration, parse_duration, Config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_duration(text) {
        assert_eq!(
            parse_duration(&format_duration(d)),
            Ok(d),
            "duration {text:?}"
        );
    }
    let mut config = Config::default();
    if config.merge_toml(text, "fuzz").is_err() {
        return;
    }
    let shown = config.to_toml();
    let mut back = Config::default();
    if let Err(e) = back.merge_toml(&shown, "to_toml") {
        panic!("to_toml output does not load: {e}\ninput: {text:?}\noutput:\n{shown}");
    }
    assert_eq!(back, config, "round trip changed the config\n{shown}");
});
