//! The configuration file from a hostile or careless operator: any text must give a
//! configuration or an error that names a place in the file, never a panic; a
//! configuration that parsed validates again, can be summarised, and reloads onto
//! itself with nothing restart-only changed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsubame_config::Config;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Ok(config) => {
            assert!(
                config.revalidate().is_ok(),
                "a parsed configuration fails revalidation"
            );
            let _ = config.summary();
            let mut reloaded = config.clone();
            assert!(config.keep_restart_only(&mut reloaded).is_empty());
        }
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.starts_with("fuzz.toml"),
                "an error that names no place: {message}"
            );
        }
    }
});
